"""Hub publishing: the model card of every saved pipeline, and the upload of a folder to the Hub.

`make_model_card` writes every README.md that ddim_plus produces (`save_pretrained`, `push_to_hub`, the trainer)
with huggingface_hub's `ModelCard` / `ModelCardData`, one set of tags and a license; a trainer's card adds optional
sections (samples, a results table whose scores become the Hub's model-index, the training configuration).
`create_hub_repo` and `upload_to_hub` make the Hub calls; `push_to_hub` chains them, and `HubPublisher` publishes a
training run as it goes (repo created at start-up, snapshots uploaded in the background). Like diffusers'
`load_or_create_model_card`, an upload keeps the card already on the Hub (`merge_model_card`): only the sections
ddim_plus writes are replaced.
"""

import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import Future
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from huggingface_hub import (
    CommitInfo,
    EvalResult,
    ModelCard,
    ModelCardData,
    create_repo,
    hf_hub_download,
    upload_folder,
)
from huggingface_hub.utils import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from ._version import __version__
from .ddim_math import TIMESTEP_SPACINGS

logger = logging.getLogger(__name__)

MODEL_CARD_TAGS = ("ddim-plus", "diffusers", "unconditional-image-generation", "ddim")
DEFAULT_LICENSE = "apache-2.0"
# pyproject.toml names no source repository and no index serves the package: the card says so and installs from the
# source tree, the folder holding pyproject.toml.
NOT_ON_PYPI = (
    "ddim_plus is not published on PyPI; install it from its source tree (the folder holding `pyproject.toml`)"
)
INSTALL_COMMAND = "pip install /path/to/ddim_plus"
TASK = "unconditional-image-generation"
TUNED_SCHEDULES_HEADING = "## Tuned timestep schedules"
OTHER_SCHEDULERS_HEADING = "## Other diffusers schedulers"
# The sections ddim_plus writes; an upload replaces these in the card on the Hub and keeps everything else.
OWNED_HEADINGS = (
    "## How to use",
    OTHER_SCHEDULERS_HEADING,
    "## Samples",
    "## Results",
    TUNED_SCHEDULES_HEADING,
    "## Training configuration",
)
LOADING_NOTE_START = "> **Load with `import ddim_plus` first**"
# The spacings stock diffusers' DDIMScheduler has; it raises `ValueError` on ours at the first `set_timesteps`.
STOCK_SPACINGS = ("leading", "trailing", "linspace")
_OWN_SPACINGS = tuple(s for s in TIMESTEP_SPACINGS if s not in STOCK_SPACINGS)

# How each pipeline is called in the card's snippet.
_USAGE = {
    "DDIMPlusPipeline": (
        "images = pipeline(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images"
    ),
    "DDIMInversionPipeline": "latents = pipeline(images, num_inference_steps=50).latents  # images in [0, 1]",
}


def make_model_card(
    repo_id: str,
    scheduler_config: Mapping[str, object],
    pipeline_class: str = "DDIMPlusPipeline",
    description: Optional[str] = None,
    dataset_name: Optional[str] = None,
    sample_images: Sequence[str] = (),
    metrics: Sequence[Dict[str, object]] = (),
    metric_columns: Sequence[str] = (),
    metrics_dataset: Optional[Tuple[str, str]] = None,
    metrics_description: Optional[str] = None,
    training_config: Optional[Dict[str, object]] = None,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The model card (README.md) of a saved pipeline.

    Its first lines say how to load the repo: `import ddim_plus` first (and what fails without it), and what stock
    `DDIMPipeline` drops from this scheduler config. Then the how-to, the optional sections that are given, and the
    tuned timestep schedules of the scheduler config if it has any.

    Args:
        repo_id (`str`): the Hub repo id, or the folder's name for a local pipeline; shown in the title and snippet.
        scheduler_config (`Mapping[str, object]`): the pipeline's `scheduler.config`.
        pipeline_class (`str`, defaults to `"DDIMPlusPipeline"`): the class model_index.json names.
        description (`str`, *optional*): a sentence on what the model is (e.g. what it was trained on); no local
            paths, since the card is published.
        dataset_name (`str`, *optional*): the Hub dataset id of the training data, for the `datasets` metadata.
        sample_images (`Sequence[str]`): sample grids, as paths relative to the card.
        metrics (`Sequence[Dict[str, object]]`): rows of a results table, e.g. one per number of DDIM steps.
        metric_columns (`Sequence[str]`): the columns of `metrics` that hold scores; each score becomes an
            `EvalResult` (the Hub's model-index), the other columns of its row become its `config`.
        metrics_dataset (`Tuple[str, str]`, *optional*): (type, name) of the data the scores were measured on;
            required with `metric_columns`.
        metrics_description (`str`, *optional*): how the metrics were measured.
        training_config (`Dict[str, object]`, *optional*): the settings of the training run, shown as a table.
        license (`str`, defaults to `"apache-2.0"`): the model's license.

    Returns:
        `huggingface_hub.ModelCard`: call `.save(path)` to write it.

    Raises:
        `ValueError`: `dataset_name` is not a Hub dataset id (a local path, or not of the form `name` or
        `user/name`), or `metric_columns` are given without `metrics_dataset`.
    """
    _check_hub_dataset_id(dataset_name)
    eval_results = _eval_results(metrics, metric_columns, metrics_dataset)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=TASK,
        license=license,
        tags=list(MODEL_CARD_TAGS),
        datasets=[dataset_name] if dataset_name else None,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results or None,
    )
    usage = _USAGE.get(pipeline_class, _USAGE["DDIMPlusPipeline"])
    sections: List[str] = [
        f"# {repo_id}",
        _loading_note(repo_id, pipeline_class, scheduler_config),
        description
        or "A DDIM pipeline (Song, Meng & Ermon, ICLR 2021, https://huggingface.co/papers/2010.02502), saved with "
        "ddim_plus, a diffusers plugin.",
        "## How to use",
        f"Saved with ddim_plus {__version__}. {NOT_ON_PYPI}:",
        f"```bash\n{INSTALL_COMMAND}\n```",
        "```python\n"
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f"import ddim_plus  # registers {pipeline_class} and DDIMSchedulerPlus with diffusers\n\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{repo_id}")\n'
        f"{usage}\n"
        "```",
    ]
    if pipeline_class == "DDIMPlusPipeline":
        sections += [OTHER_SCHEDULERS_HEADING, other_schedulers_markdown(scheduler_config)]
    if sample_images:
        sections += ["## Samples"]
        sections += [f"![{os.path.splitext(os.path.basename(path))[0]}]({path})" for path in sample_images]
    if metrics:
        sections += ["## Results", *([metrics_description] if metrics_description else []), _markdown_table(metrics)]
    if scheduler_config.get("tuned_timesteps"):
        sections += [TUNED_SCHEDULES_HEADING, tuned_schedules_markdown(scheduler_config["tuned_timesteps"])]
    if training_config:
        sections += [
            "## Training configuration",
            _markdown_table([{"setting": key, "value": value} for key, value in training_config.items()]),
        ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _loading_note(repo_id: str, pipeline_class: str, scheduler_config: Mapping[str, object]) -> str:
    """The card's first lines: what fails without `import ddim_plus`, and what stock `DDIMPipeline` drops."""
    dropped = []
    if scheduler_config.get("ddim_solver_order", 1) == 2:
        dropped.append("`ddim_solver_order=2` (it takes first-order steps)")
    if scheduler_config.get("sigma_type", "eta") == "sigma_hat":
        dropped.append('`sigma_type="sigma_hat"` (it adds eta noise instead)')
    spacing = scheduler_config.get("timestep_spacing")
    if spacing in _OWN_SPACINGS:
        dropped.append(
            f"the `{spacing}` spacing (it raises `ValueError` at the first call; to sample with stock diffusers "
            f'anyway, pass `scheduler=DDIMScheduler.from_pretrained("{repo_id}", subfolder="scheduler", '
            'timestep_spacing="trailing")`)'
        )
    if spacing in ("trailing", "linspace"):
        dropped.append(
            f"the `{spacing}` spacing's steps (it steps from t to t - T // S, which is not always the next "
            "scheduled timestep)"
        )
    if scheduler_config.get("tuned_timesteps"):
        dropped.append("the tuned timestep schedules below (it spaces the steps by `timestep_spacing`)")
    if dropped:
        consequence = f"it drops this config's {'; '.join(dropped)}. Its images differ from {pipeline_class}'s"
    else:
        consequence = (
            'this config uses none of what it drops (`ddim_solver_order=2`, `sigma_type="sigma_hat"`, the '
            f"{' and '.join(f'`{s}`' for s in _OWN_SPACINGS)} spacings, tuned timesteps)"
        )
    return (
        f"{LOADING_NOTE_START} (not on PyPI: see How to use). Without it, "
        f"`DiffusionPipeline.from_pretrained` fails with `AttributeError: module diffusers has no attribute "
        f"{pipeline_class}`; the fix is the one line `import ddim_plus` before it.\n>\n"
        f'> Stock `diffusers.DDIMPipeline.from_pretrained("{repo_id}")` loads the weights without ddim_plus but '
        f"swaps in a stock `DDIMScheduler`: {consequence}. diffusers' only sign is its \"config attributes ... will "
        'be ignored" warning.'
    )


def other_schedulers_markdown(scheduler_config: Mapping[str, object]) -> str:
    """The card's section on sampling with another diffusers scheduler (DPMSolverMultistepScheduler as the example).

    Stock schedulers know the `leading`, `trailing` and `linspace` spacings only and raise `ValueError` in
    `set_timesteps` on ddim_plus's own (`quadratic`, `logsnr`); `DDIMPlusPipeline` passes such a config's timesteps
    to a scheduler whose `set_timesteps` takes `timesteps`, so `from_config` is all it takes there too.

    Returns:
        `str`: the section's text, with a snippet that runs after the how-to snippet.
    """
    spacing = scheduler_config.get("timestep_spacing")
    text = (
        "`DDIMPlusPipeline` samples with whichever diffusers scheduler `pipeline.scheduler` holds (leave `eta` at 0 "
        "when its `step` takes no `eta`). "
    )
    if spacing in _OWN_SPACINGS:
        text += (
            f"This config's `{spacing}` timestep spacing is ddim_plus's own, which stock schedulers do not know: "
            "`DDIMPlusPipeline` passes its timesteps to a scheduler whose `set_timesteps` takes `timesteps` "
            "(`DPMSolverMultistepScheduler`, `EulerDiscreteScheduler`, `DDPMScheduler`), "
            "so `from_config` is all it takes. Other schedulers, and stock pipelines, raise `ValueError` on it: build "
            'them with `from_config(pipeline.scheduler.config, timestep_spacing="trailing")`.\n\n'
        )
    else:
        text += f"This config's `{spacing}` spacing is one diffusers has, so `from_config` is all it takes:\n\n"
    return text + (
        "```python\n"
        "from diffusers import DPMSolverMultistepScheduler\n\n"
        "pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)\n"
        "images = pipeline(batch_size=16, num_inference_steps=20).images\n"
        "```"
    )


def merge_model_card(existing: str, ours: str) -> str:
    """Lay the card ddim_plus wrote (`ours`) over a card that already exists (`existing`, e.g. one edited on the
    Hub), as diffusers' `load_or_create_model_card` keeps an existing card: everything of `existing` is kept except
    what ddim_plus writes.

    Replaced: the sections under `OWNED_HEADINGS` that `ours` has (appended when `existing` lacks them), and the
    loading note at the top when `existing` still has it. Metadata: the tags are merged; `library_name`,
    `pipeline_tag` and `license` are filled in only where unset; `datasets` and the results (model-index) are
    `ours` when `ours` has them. The title, the description and every other section stay as they are.

    Args:
        existing (`str`): the card's text now, with or without a metadata block.
        ours (`str`): a card from `make_model_card`.

    Returns:
        `str`: the merged card's text.
    """
    existing_card, our_card = ModelCard(existing, ignore_metadata_errors=True), ModelCard(ours)
    text = existing_card.text
    our_sections = _card_sections(our_card.text)
    for heading in OWNED_HEADINGS:
        if heading in our_sections:
            text = set_card_section(text, heading, our_sections[heading])
    text = _replace_loading_note(text, our_card.text)

    data, our_data = existing_card.data, our_card.data
    tags = [data.tags] if isinstance(data.tags, str) else list(data.tags or [])
    data.tags = list(dict.fromkeys([*tags, *(our_data.tags or [])]))
    for key in ("library_name", "pipeline_tag", "license"):
        if getattr(data, key, None) is None:
            setattr(data, key, getattr(our_data, key))
    if our_data.datasets:
        data.datasets = our_data.datasets
    if our_data.eval_results:
        data.eval_results, data.model_name = our_data.eval_results, our_data.model_name
    return f"---\n{data.to_yaml()}\n---\n\n" + text.lstrip("\n")


def _card_sections(text: str) -> Dict[str, str]:
    """The `## ` sections of a card's text: heading -> body (up to the next `## ` heading)."""
    sections: Dict[str, List[str]] = {}
    current = None
    for line in text.split("\n"):
        if line.startswith("## "):
            current = line
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {heading: "\n".join(lines).strip("\n") for heading, lines in sections.items()}


def _loading_note_span(lines: List[str]) -> Optional[Tuple[int, int]]:
    """(first, end) line indices of the block quote that opens with `LOADING_NOTE_START`, if any."""
    start = next((i for i, line in enumerate(lines) if line.startswith(LOADING_NOTE_START)), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith(">")), len(lines))
    return start, end


def _replace_loading_note(text: str, our_text: str) -> str:
    """`text` with its loading note replaced by `our_text`'s; unchanged if either has none (one removed on the Hub
    stays removed)."""
    lines, our_lines = text.split("\n"), our_text.split("\n")
    span, our_span = _loading_note_span(lines), _loading_note_span(our_lines)
    if span is None or our_span is None:
        return text
    return "\n".join(lines[: span[0]] + our_lines[our_span[0] : our_span[1]] + lines[span[1] :])


def hub_card_text(repo_id: str, token: Optional[str] = None) -> Optional[str]:
    """The README.md of the model repo `repo_id` on the Hub, or `None` if the repo or the file does not exist.

    Raises:
        `OSError`: the card could not be read (`LocalEntryNotFoundError` when the Hub cannot be reached, an HTTP
        error otherwise).
    """
    try:
        path = hf_hub_download(repo_id, "README.md", repo_type="model", token=token)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError that means "unreachable", not "absent"
        raise
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _keep_hub_card(folder: str, repo_id: str, token: Optional[str]) -> bool:
    """Merge the card on the Hub into `folder`'s README.md (see `merge_model_card`), so the upload keeps it.

    Returns:
        `bool`: `False` when the Hub's card could not be read: the caller then leaves README.md out of the upload
        rather than overwrite a card it has not seen.
    """
    card_path = os.path.join(folder, "README.md")
    if not os.path.isfile(card_path):
        return True
    try:
        existing = hub_card_text(repo_id, token=token)
    except OSError as error:  # unreachable, or an HTTP error: huggingface_hub's errors are OSErrors
        logger.warning(f"Could not read the model card of {repo_id} ({error}); uploading without README.md.")
        return False
    if existing is not None:
        with open(card_path, encoding="utf-8") as handle:
            ours = handle.read()
        with open(card_path, "w", encoding="utf-8") as handle:
            handle.write(merge_model_card(existing, ours))
    return True


def _check_hub_dataset_id(dataset_name: Optional[str]) -> None:
    """`datasets:` holds Hub ids only: the Hub links each one, and a local path would be a broken link (and leak)."""
    if dataset_name is None:
        return
    try:
        validate_repo_id(dataset_name)
        is_id = not os.path.exists(dataset_name)
    except HFValidationError:
        is_id = False
    if not is_id:
        raise ValueError(
            f"`dataset_name`={dataset_name!r} is not a Hub dataset id (a local path, or not `name` or `user/name`); "
            "leave `dataset_name` out and describe the data in `description`."
        )


def _eval_results(
    metrics: Sequence[Dict[str, object]], metric_columns: Sequence[str], dataset: Optional[Tuple[str, str]]
) -> List[EvalResult]:
    """One `EvalResult` per score in `metrics`; the row's other columns (e.g. the number of steps) are its config."""
    if metric_columns and dataset is None:
        raise ValueError("`metric_columns` needs `metrics_dataset` (the type and name of the data scored on).")
    results = []
    for row in metrics:
        setting = ", ".join(f"{key}={value}" for key, value in row.items() if key not in metric_columns)
        for column in metric_columns:
            if isinstance(row.get(column), (int, float)):
                results.append(
                    EvalResult(
                        task_type=TASK,
                        task_name="Unconditional image generation",
                        dataset_type=dataset[0],
                        dataset_name=dataset[1],
                        metric_type=re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_"),
                        metric_name=f"{column} ({setting})" if setting else column,
                        metric_value=row[column],
                        metric_config=setting or None,
                    )
                )
    return results


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


def tuned_schedules_markdown(entries: Sequence[Dict[str, object]]) -> str:
    """The model-card text listing the schedules stored in the scheduler config's `tuned_timesteps`.

    Args:
        entries (`Sequence[Dict[str, object]]`): the `tuned_timesteps` entries (see `DDIMSchedulerPlus`).

    Returns:
        `str`: a sentence and a table (steps, solver order, timesteps and, for a tuned sampler, its per-step
        extrapolation weights and eps scales).
    """

    def per_step(values) -> str:
        return "-" if values is None else ", ".join(f"{float(v):.3g}" for v in values)

    rows = [
        {
            "steps": entry["num_inference_steps"],
            "solver_order": entry["solver_order"],
            "timesteps": ", ".join(str(t) for t in entry["timesteps"]),
            "extrapolation": per_step(entry.get("extrapolation")),
            "eps_scale": per_step(entry.get("eps_scale")),
        }
        for entry in entries
    ]
    return (
        "Samplers tuned to this model by `ddim-plus tune-steps` (matching a many-step run of the model itself): "
        "the timesteps and, where given, each step's extrapolation weight and eps scale. "
        "`pipeline(num_inference_steps=S)` uses them when the scheduler's `ddim_solver_order` matches (the "
        "coefficients at eta = 0 only); other step counts use the `timestep_spacing`.\n\n" + _markdown_table(rows)
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


def create_hub_repo(repo_id: str, private: Optional[bool] = None, token: Optional[str] = None) -> str:
    """Create the model repo `repo_id`, or reuse it if it exists; a bad token or a missing permission raises here.

    Args:
        repo_id (`str`): `name` or `user/name`.
        private (`bool`, *optional*): make a new repo private (an existing repo keeps its visibility).
        token (`str`, *optional*): a Hub token; the logged-in one otherwise.

    Returns:
        `str`: the repo id the Hub resolved (with the user or organisation).
    """
    return create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id


def upload_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    commit_message: str,
    token: Optional[str] = None,
    create_pr: bool = False,
    ignore_patterns: Optional[Sequence[str]] = None,
    run_as_future: bool = False,
) -> Union[CommitInfo, "Future[CommitInfo]"]:
    """Upload `folder` to the existing model repo `repo_id` (see `create_hub_repo`) in one commit.

    A card already on the Hub is kept: `folder`'s README.md is first merged into it (`merge_model_card`, which
    replaces only the sections ddim_plus writes), and the merged card is written back to `folder` and uploaded.

    Args:
        folder (`str` or `os.PathLike`): the folder to upload; with `run_as_future=True` it must stay unchanged until
            the future is done, since the upload reads it in the background.
        repo_id (`str`): the repo, as `create_hub_repo` returned it.
        commit_message (`str`): the commit's message.
        token (`str`, *optional*): a Hub token; the logged-in one otherwise.
        create_pr (`bool`, defaults to `False`): open a pull request instead of committing.
        ignore_patterns (`Sequence[str]`, *optional*): files left out (e.g. checkpoints and logs).
        run_as_future (`bool`, defaults to `False`): return at once with a `concurrent.futures.Future`;
            huggingface_hub runs its background uploads one after another, in the order they were started.

    Returns:
        `huggingface_hub.CommitInfo` (its `str` is the commit URL), or a `Future` of it.
    """
    ignore_patterns = list(ignore_patterns or [])
    if not _keep_hub_card(os.fspath(folder), repo_id, token):
        ignore_patterns.append("README.md")
    return upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
        ignore_patterns=ignore_patterns or None,
        repo_type="model",
        run_as_future=run_as_future,
    )


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    commit_message: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    create_pr: bool = False,
    ignore_patterns: Optional[Sequence[str]] = None,
) -> CommitInfo:
    """`create_hub_repo` then `upload_to_hub`: publish a saved pipeline folder in one call.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `str` is the commit URL, `.repo_url.repo_id` the repo).
    """
    repo_id = create_hub_repo(repo_id, private=private, token=token)
    return upload_to_hub(
        folder, repo_id, commit_message, token=token, create_pr=create_pr, ignore_patterns=ignore_patterns
    )


class HubPublisher:
    """Publish a training run to the Hub as it goes.

    The repo is created when the publisher is, so a bad token or a missing permission fails before any training.
    `upload_snapshot` saves a snapshot into a temporary folder and uploads it in the background (huggingface_hub's
    `run_as_future`), so training goes on meanwhile; the folder is deleted once its upload is done. `finish` waits
    for the pending uploads, then uploads the final folder. The token is kept in memory only.

    Args:
        repo_id (`str`): `name` or `user/name`.
        private (`bool`, *optional*): make a new repo private (an existing repo keeps its visibility).
        token (`str`, *optional*): a Hub token; the logged-in one otherwise.
    """

    def __init__(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None):
        self._token = token
        self.repo_id = create_hub_repo(repo_id, private=private, token=token)
        self._pending: List[Future] = []

    def upload_snapshot(self, save: Callable[[str], None], commit_message: str) -> Future:
        """Call `save(folder)` now (e.g. a pipeline's `save_pretrained`) and upload `folder` in the background.

        Returns:
            `concurrent.futures.Future`: the upload.
        """
        folder = tempfile.mkdtemp(prefix="ddim-plus-upload-")
        save(folder)
        future = upload_to_hub(folder, self.repo_id, commit_message, token=self._token, run_as_future=True)
        future.add_done_callback(lambda _: shutil.rmtree(folder, ignore_errors=True))
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Wait for the pending uploads. One that failed is logged, not raised: a network hiccup must not end a
        run, and the final upload sends the whole pipeline again."""
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result()
            except Exception as error:  # whatever failed, the final upload sends everything again
                logger.warning(f"A background upload to {self.repo_id} failed ({error}); the final upload resends.")

    def finish(
        self, folder: Union[str, os.PathLike], commit_message: str, ignore_patterns: Optional[Sequence[str]] = None
    ) -> CommitInfo:
        """Wait for the pending uploads, then upload `folder` (and wait for that too).

        Returns:
            `huggingface_hub.CommitInfo`: the final commit.
        """
        self.wait()
        return upload_to_hub(folder, self.repo_id, commit_message, token=self._token, ignore_patterns=ignore_patterns)
