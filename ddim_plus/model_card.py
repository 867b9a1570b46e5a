"""Model cards for pipelines trained with `training/train.py`, made with huggingface_hub's `ModelCard`."""

import os
from typing import Dict, List, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData

MODEL_CARD_TAGS = ("ddim", "ddim-plus", "diffusers", "unconditional-image-generation")
TUNED_SCHEDULES_HEADING = "## Tuned timestep schedules"


def _markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def _format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def make_model_card(
    repo_id: str,
    dataset_name: Optional[str],
    training_config: Dict[str, object],
    sample_images: Sequence[str] = ("samples.png",),
    metrics: Optional[Sequence[Dict[str, object]]] = None,
    metrics_description: Optional[str] = None,
    dataset_description: Optional[str] = None,
    license: str = "apache-2.0",
    extra_tags: Sequence[str] = (),
) -> ModelCard:
    """The model card (README.md) of a trained DDIM pipeline.

    Args:
        repo_id (`str`): the Hub repo id, or the output folder's name for a local model; shown in the title and in
            the loading snippet.
        dataset_name (`str`, *optional*): the Hub dataset id of the training data, for the `datasets` metadata
            (leave it out for other data and describe that with `dataset_description`).
        training_config (`Dict[str, object]`): the command-line settings of the run, shown as a table.
        sample_images (`Sequence[str]`, defaults to `("samples.png",)`): sample grids, as paths relative to the card.
        metrics (`Sequence[Dict[str, object]]`, *optional*): rows of a results table, e.g. one per number of DDIM
            steps with the quality figures measured at it.
        metrics_description (`str`, *optional*): a sentence saying how the metrics were measured.
        dataset_description (`str`, *optional*): words for the data in the text (defaults to `dataset_name`); no
            local paths, since the card is published.
        license (`str`, defaults to `"apache-2.0"`): the model's license.
        extra_tags (`Sequence[str]`): tags added to ddim, ddim-plus, diffusers and unconditional-image-generation.

    Returns:
        `huggingface_hub.ModelCard`: call `.save(path)` to write it.

    Raises:
        `ValueError`: `dataset_name` is a local path (the Hub would link it as a dataset that does not exist).
    """
    if dataset_name is not None and os.path.exists(dataset_name):
        raise ValueError(
            f"`dataset_name`={dataset_name!r} is a local path, not a Hub dataset id; describe the data with "
            "`dataset_description` instead."
        )
    data = dataset_description or (f"`{dataset_name}`" if dataset_name else None)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=license,
        tags=list(dict.fromkeys([*MODEL_CARD_TAGS, *extra_tags])),
        datasets=[dataset_name] if dataset_name else None,
    )
    sections: List[str] = [
        f"# {repo_id}",
        "An unconditional image model trained"
        + (f" on {data}" if data else "")
        + " with ddim_plus's `training/train.py`, for sampling with DDIM (Song, Meng & Ermon, ICLR 2021).",
        *(["## Samples"] if sample_images else []),
        *[f"![{os.path.splitext(os.path.basename(path))[0]}]({path})" for path in sample_images],
        "## How to use",
        "```python\n"
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        "import ddim_plus  # registers DDIMPlusPipeline and DDIMSchedulerPlus with diffusers\n\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
        "images = pipeline(batch_size=16, num_inference_steps=50, eta=0.0, "
        "generator=torch.Generator().manual_seed(0)).images\n"
        "```",
    ]
    if metrics:
        sections += ["## Results", *([metrics_description] if metrics_description else []), _markdown_table(metrics)]
    sections += [
        "## Training configuration",
        _markdown_table([{"setting": key, "value": value} for key, value in training_config.items()]),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def tuned_schedules_markdown(entries: Sequence[Dict[str, object]]) -> str:
    """The model-card text listing the schedules stored in the scheduler config's `tuned_timesteps`.

    Args:
        entries (`Sequence[Dict[str, object]]`): the `tuned_timesteps` entries (see `DDIMSchedulerPlus`).

    Returns:
        `str`: a sentence and a table (steps, solver order, timesteps).
    """
    rows = [
        {
            "steps": entry["num_inference_steps"],
            "solver_order": entry["solver_order"],
            "timesteps": ", ".join(str(t) for t in entry["timesteps"]),
        }
        for entry in entries
    ]
    return (
        "Timesteps tuned to this model by `ddim-plus tune-steps` (matching a many-step run of the model itself). "
        "`pipeline(num_inference_steps=S)` uses them when the scheduler's `ddim_solver_order` matches; other "
        "step counts use the `timestep_spacing`.\n\n" + _markdown_table(rows)
    )


def set_card_section(card_text: str, heading: str, body: str) -> str:
    """Put `body` under the markdown `heading` (e.g. ``"## Results"``) of a card: the section is replaced if the
    card has it (up to the next heading of the same level), appended otherwise.

    Returns:
        `str`: the new card text.
    """
    lines = card_text.rstrip("\n").split("\n")
    level = heading.split(" ")[0] + " "
    section = [heading, "", body.rstrip("\n"), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(level)), len(lines))
        lines = lines[:start] + section + lines[end:]
    else:
        lines = lines + [""] + section
    return "\n".join(lines).rstrip("\n") + "\n"
