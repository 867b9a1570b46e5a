"""Train an unconditional `UNet2DModel` and publish it as a DDIM pipeline: `ddim_plus.train` run as a script.

    accelerate launch training/train.py [flags]      # the same as `accelerate launch -m ddim_plus.train [flags]`

The trainer itself is `ddim_plus/train.py`, so that it also runs from an installed package; see docs/training.md.
"""

from ddim_plus.train import cli

if __name__ == "__main__":
    cli()
