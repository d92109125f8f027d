"""LLaVA / Qwen-VL conversation data: load it, check it, and say clearly what is wrong.

Visual instruction tuning data (LLaVA, LLaVA-1.5, ShareGPT4V, Qwen-VL, ...) is a list of
records like this one, either as one JSON list (``data.json``) or one record per
line (``data.jsonl``), next to a folder of images::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",        # or "images": [..] for several
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
        {"from": "gpt",   "value": "The bus is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt",   "value": "An advertisement."}]}

``<image>`` is the *placeholder*: the processor later replaces each one by the
image's tokens (576 for LLaVA-1.5, 64 latents for Flamingo, ...), so the number of
placeholders must equal the number of images.

Qwen-VL writes images inline instead, ``"Picture 1: <img>assets/demo.jpg</img>\\nWhat
is this?"``; such records are converted: every ``<img>PATH</img>`` becomes an
``<image>`` placeholder and PATH joins the record's image list (in order).

What ``validate_record`` returns (the *normalised record*, used by the rest of mmkit)::

    {"id": str | None,
     "images": [str (resolved path) | PIL.Image, ...],     # possibly empty: text-only
     "conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...],
     ...any other keys of the input record, unchanged ("meta", "source", ...)}

Rules it enforces (each failure is a ``DataError`` naming file, line or index,
record id, what is wrong and how to fix it):

* a record is a JSON object with a non-empty ``conversations`` list (``messages`` is
  accepted as an alias); each turn has ``from``/``value`` (or ``role``/``content``)
* roles: ``human``/``user``, ``gpt``/``assistant``, ``system`` (normalised to
  ``human``, ``gpt``, ``system``); one optional system turn, first
* turns alternate human, gpt, human, gpt...; the first is human; for training
  (``require_answer=True``) the last is gpt, otherwise there is nothing to learn
* no empty turns
* ``<image>`` only in human turns, as many as images.  LLaVA convention: a record with
  exactly **one** image and **no** placeholder gets ``"<image>\\n"`` prepended to its
  first human turn (LLaVA's own loader does the same); with several images the
  placement is ambiguous, so it is an error
* image files exist (``check_images="exists"``) and decode (``check_images=True``)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .images import ImageError, load_image

__all__ = [
    "DataError",
    "IMAGE_PLACEHOLDER",
    "ROLE_ALIASES",
    "load_conversations",
    "load_records",
    "validate_record",
    "load_hf_dataset",
    "convert_inline_images",
]

IMAGE_PLACEHOLDER = "<image>"  # same string as mmkit.language.IMAGE_TOKEN
_INLINE_IMG = re.compile(r"<img>(.*?)</img>", re.DOTALL)  # Qwen-VL style inline image

# Every spelling of a role -> mmkit's (LLaVA's) name for it.
ROLE_ALIASES = {
    "human": "human", "user": "human",
    "gpt": "gpt", "assistant": "gpt",
    "system": "system",
}


class DataError(ValueError):
    """A record that cannot be used. ``str(err)`` is the whole message; the parts are
    kept as attributes: ``where`` (file + line/index + record id), ``problem``, ``fix``."""

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}\n  How to fix: {fix}")


# --------------------------------------------------------------------------- records


def _record_where(where: str, rec_id: Any) -> str:
    return f"{where}, record {str(rec_id)!r}" if rec_id is not None else where


def convert_inline_images(text: str) -> tuple[str, list[str]]:
    """Qwen-VL ``<img>path</img>`` -> ``<image>`` placeholder; returns (text, paths).

    >>> convert_inline_images("Picture 1: <img>a.jpg</img>\\nWhat is it?")
    ('Picture 1: <image>\\nWhat is it?', ['a.jpg'])
    """
    paths: list[str] = []

    def repl(m: re.Match) -> str:
        paths.append(m.group(1).strip())
        return IMAGE_PLACEHOLDER

    return _INLINE_IMG.sub(repl, text), paths


def _resolve(p: str | Path, image_folder: Path | None) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or image_folder is None:
        return path
    return image_folder / path


def validate_record(
    rec: Any,
    *,
    where: str,
    image_folder: str | Path | None = None,
    check_images: bool | str = True,
    require_answer: bool = True,
) -> dict:
    """Check one record and return its normalised form (see the module docstring).

    Args:
        rec: the record (a dict, as parsed from JSON, or a ShapesWorld sample with PIL
            images).
        where: where it came from, for messages, e.g. ``"data.jsonl line 12"``; the
            record id is appended.
        image_folder: relative image paths are resolved against it (absolute paths
            are used as they are; without a folder, relative to the current folder).
        check_images: ``True`` decodes every image (catches corrupt files before
            training starts), ``"exists"`` only checks that files exist (fast, for
            very large datasets), ``False`` touches no file.
        require_answer: the last turn must be an assistant turn (training data).
            Set False for prompts you will generate answers for.

    Raises:
        DataError: with where, what and how to fix.
    """
    if not isinstance(rec, dict):
        raise DataError(
            where,
            f"a record must be a JSON object {{...}}, got {type(rec).__name__} "
            f"{_short(rec)}.",
            'write each record as {"id": ..., "image": ..., "conversations": [...]}.',
        )
    rec_id = rec.get("id")
    w = _record_where(where, rec_id)
    folder = Path(image_folder).expanduser() if image_folder is not None else None

    # ---- conversations -------------------------------------------------------
    key = "conversations" if "conversations" in rec else ("messages" if "messages" in rec else None)
    if key is None:
        raise DataError(
            w,
            f"missing the 'conversations' list (keys present: {sorted(rec)}).",
            'add "conversations": [{"from": "human", "value": "<image>\\n..."}, '
            '{"from": "gpt", "value": "..."}].',
        )
    turns = rec[key]
    if isinstance(turns, str):  # some datasets store the list as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            pass
    if not isinstance(turns, list) or not turns:
        raise DataError(
            w,
            f"'{key}' must be a non-empty list of turns, got {_short(turns)}.",
            'give at least a human turn and a gpt turn: [{"from": "human", "value": ...}, '
            '{"from": "gpt", "value": ...}].',
        )

    conv: list[dict] = []
    inline_paths: list[str] = []
    for t, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise DataError(w, f"turn {t} is a {type(turn).__name__}, not an object: {_short(turn)}.",
                            'write each turn as {"from": "human" | "gpt", "value": "..."}.')
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role is None:
            raise DataError(w, f"turn {t} has no 'from' (keys: {sorted(turn)}).",
                            'add "from": "human" or "from": "gpt" to the turn.')
        norm = ROLE_ALIASES.get(str(role).strip().lower())
        if norm is None:
            raise DataError(
                w,
                f"turn {t} has unknown role {role!r}.",
                "use one of 'human' (or 'user'), 'gpt' (or 'assistant'), 'system'.",
            )
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                w,
                f"turn {t} ({norm}) is empty (value={_short(value)}).",
                "give the turn some text, or remove the turn (and its partner, so that "
                "human and gpt turns still alternate).",
            )
        value, found = convert_inline_images(value)
        inline_paths += found
        conv.append({"from": norm, "value": value})

    # ---- order: [system] human gpt human gpt ... -----------------------------
    roles = [c["from"] for c in conv]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        i = roles.index("system", 1 if roles[0] == "system" else 0) + 1
        raise DataError(w, f"turn {i} is a system turn; a system turn is only allowed first.",
                        "move the system text to the first turn (one system turn per record).")
    if not body:
        raise DataError(w, "the record has a system turn but no human turn.",
                        "add a human turn and a gpt turn after the system turn.")
    offset = len(roles) - len(body)
    if body[0] != "human":
        raise DataError(
            w,
            f"turn {offset + 1} is '{body[0]}' but the first turn (after an optional system "
            "turn) must be from the human.",
            "start the conversation with the human's question; drop a leading gpt turn.",
        )
    for j, r in enumerate(body):
        expected = "human" if j % 2 == 0 else "gpt"
        if r != expected:
            raise DataError(
                w,
                f"turns must alternate human/gpt, but turns {offset + j} and {offset + j + 1} "
                f"are both '{r}'.",
                "merge the two consecutive turns into one, or insert the missing "
                f"{expected} turn.",
            )
    if require_answer and body[-1] != "gpt":
        raise DataError(
            w,
            f"the last turn (turn {len(roles)}) is from the human, so there is no answer "
            "to train on.",
            "add the gpt answer, or remove the trailing human turn (or pass "
            "require_answer=False for prompts that will be answered by generation).",
        )

    # ---- images ---------------------------------------------------------------
    raw = rec.get("images", rec.get("image"))
    if "image" in rec and "images" in rec:
        raise DataError(w, "the record has both 'image' and 'images'.",
                        "keep one: 'image' for one image, 'images' for a list.")
    if raw is None:
        images: list[Any] = []
    elif isinstance(raw, (list, tuple)):
        images = list(raw)
    else:
        images = [raw]
    if images and inline_paths:
        raise DataError(
            w,
            f"the record lists images in '{'images' if 'images' in rec else 'image'}' and also "
            f"inline as <img>...</img> ({inline_paths}); the order would be ambiguous.",
            "use one style: either the 'image(s)' key with <image> placeholders (LLaVA), "
            "or <img>path</img> in the text (Qwen-VL).",
        )
    images = images or list(inline_paths)
    for k, im in enumerate(images, start=1):
        if im is None or (isinstance(im, str) and not im.strip()):
            raise DataError(w, f"image {k} is empty ({im!r}).",
                            "give the image's path relative to image_folder, or remove it.")

    # ---- placeholders ---------------------------------------------------------
    for t, c in enumerate(conv, start=1):
        if c["from"] != "human" and IMAGE_PLACEHOLDER in c["value"]:
            raise DataError(
                w,
                f"turn {t} ({c['from']}) contains {IMAGE_PLACEHOLDER!r}; images can only be "
                "shown in human turns.",
                f"move {IMAGE_PLACEHOLDER!r} to a human turn (usually the first).",
            )
    n_ph = sum(c["value"].count(IMAGE_PLACEHOLDER) for c in conv)
    if len(images) == 1 and n_ph == 0:
        # LLaVA convention: one image, no placeholder -> image first, then the question.
        first = next(c for c in conv if c["from"] == "human")
        first["value"] = IMAGE_PLACEHOLDER + "\n" + first["value"]
        n_ph = 1
    if n_ph != len(images):
        raise DataError(
            w,
            f"the human turns contain {n_ph} {IMAGE_PLACEHOLDER!r} placeholder(s) but the "
            f"record has {len(images)} image(s).",
            f"put exactly one {IMAGE_PLACEHOLDER!r} in the text where each image should go "
            "(in the order of the image list), or fix the image list.",
        )

    # ---- image files ---------------------------------------------------------
    out_images: list[Any] = []
    for k, im in enumerate(images, start=1):
        label = f"{w}, image {k}" if len(images) > 1 else w
        if isinstance(im, dict) and ("bytes" in im or "path" in im):  # datasets' undecoded Image()
            im = im.get("bytes") or im.get("path")
        if isinstance(im, (str, Path)):
            if str(im).startswith(("http://", "https://")):
                if check_images:
                    raise DataError(
                        label, f"image {str(im)!r} is a URL; mmkit never downloads (offline).",
                        "download the images into a folder, write their relative paths in the "
                        "data, and pass image_folder=...; or check_images=False to keep URLs.")
                out_images.append(str(im))
                continue
            path = _resolve(im, folder)
            if check_images:
                if not path.is_file():
                    raise DataError(
                        label,
                        f"image file not found: {str(im)!r} resolved to {str(path.resolve())!r} "
                        f"(image_folder={str(folder.resolve()) if folder is not None else None!r}).",
                        "pass the right image_folder= (the folder the paths in the data are "
                        "relative to) or fix the path in the record; check_images=False skips "
                        "this check.",
                    )
                if check_images is True:
                    try:
                        load_image(path, where=label)
                    except ImageError as e:
                        raise DataError(label, f"unreadable image {str(path)!r}: {e.problem}", e.fix) from e
            out_images.append(str(path.resolve()) if check_images else str(path))
        elif isinstance(im, (Image.Image, bytes, bytearray)) or hasattr(im, "__array__"):
            if check_images is True or not isinstance(im, Image.Image):
                try:
                    im = load_image(im, where=label)
                except ImageError as e:
                    raise DataError(label, f"unusable image: {e.problem}", e.fix) from e
            out_images.append(im)
        else:
            raise DataError(label, f"image {k} is a {type(im).__name__}, not a path or image.",
                            "give a path (str) relative to image_folder, or a PIL image.")

    out = {k: v for k, v in rec.items() if k not in ("image", "images", "conversations", "messages")}
    out["id"] = None if rec_id is None else str(rec_id)
    out["images"] = out_images
    out["conversations"] = conv
    return out


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------- files


def _read_records(path: Path) -> tuple[list[tuple[str, Any]], list[DataError]]:
    """Parse a JSON list or JSONL file -> [(where, record)], [parse errors]."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"the file is not UTF-8 text ({e}).",
                        "save it as UTF-8 (JSON files must be UTF-8).") from e
    stripped = text.lstrip()
    if not stripped:
        raise DataError(str(path), "the file is empty.", "write at least one record.")

    # A JSON document (list, or a single object) -----------------------------------
    whole: Any = None
    is_whole = False
    if stripped[0] == "[" or (stripped[0] == "{" and path.suffix.lower() == ".json"):
        try:
            whole, is_whole = json.loads(text), True
        except json.JSONDecodeError as e:
            if stripped[0] == "[" or not e.msg.startswith("Extra data"):
                raise DataError(
                    f"{path} line {e.lineno}",
                    f"invalid JSON: {e.msg} at line {e.lineno}, column {e.colno}.",
                    "fix the JSON syntax there (a missing comma, quote or bracket is typical); "
                    "`python -m json.tool FILE` shows the same position.",
                ) from e
            # '{...}\n{...}' -> JSONL saved with a .json name: fall through
    if is_whole:
        if isinstance(whole, dict):
            for k in ("data", "records", "annotations"):
                if isinstance(whole.get(k), list):
                    whole = whole[k]
                    break
            else:
                if "conversations" in whole or "messages" in whole:
                    whole = [whole]
                else:
                    raise DataError(
                        str(path),
                        f"the file holds one JSON object (keys {sorted(whole)[:8]}), not a list of records.",
                        "write a JSON list [{...}, {...}] or one record per line (JSONL).",
                    )
        if not isinstance(whole, list):
            raise DataError(str(path), f"expected a list of records, got {type(whole).__name__}.",
                            "write a JSON list [{...}, {...}] or one record per line (JSONL).")
        return [(f"{path} index {i}", r) for i, r in enumerate(whole)], []

    # JSONL --------------------------------------------------------------------------
    items: list[tuple[str, Any]] = []
    errors: list[DataError] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append(DataError(
                f"{path} line {n}",
                f"invalid JSON at column {e.colno}: {e.msg}.",
                "each line of a .jsonl file must be one complete JSON object; fix the syntax "
                "at that column (a missing comma or quote, or a record split across lines). "
                "If the file is one JSON list, it must start with '['.",
            ))
    return items, errors


def load_conversations(
    path: str | Path,
    image_folder: str | Path | None = None,
    *,
    check_images: bool | str = True,
    strict: bool = True,
    require_answer: bool = True,
) -> list[dict] | tuple[list[dict], list[DataError]]:
    """Load and validate a LLaVA / Qwen-VL conversation file (JSON list or JSONL).

    Args:
        path: ``.json`` (a list of records) or ``.jsonl`` (one record per line). The
            format is detected from the content, not trusted from the name.
        image_folder: the folder image paths are relative to. Default: the data
            file's own folder.
        check_images: ``True`` (decode every image), ``"exists"`` (only check that
            files exist), ``False`` (no check).
        strict: ``True`` raises the first ``DataError``. ``False`` skips bad records
            and returns ``(records, errors)``; print the errors to see what was dropped.
        require_answer: every record must end with an assistant turn.

    Returns:
        normalised records (see ``validate_record``); with ``strict=False`` a tuple
        ``(records, errors)``. Records without an id get ``"<file stem>-<line or index>"``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(str(path), f"data file not found (resolved to {str(path.resolve())!r}).",
                        "check the path; conversation data is a .json list or a .jsonl file.")
    folder = Path(image_folder).expanduser() if image_folder is not None else path.parent
    if image_folder is not None and not folder.is_dir() and check_images:
        raise DataError(str(path), f"image_folder {str(folder)!r} is not a folder.",
                        "pass the folder that the image paths in the data are relative to.")

    items, errors = _read_records(path)
    if errors and strict:
        raise errors[0]
    records: list[dict] = []
    for where, rec in items:
        try:
            r = validate_record(rec, where=where, image_folder=folder,
                                check_images=check_images, require_answer=require_answer)
        except DataError as e:
            if strict:
                raise
            errors.append(e)
            continue
        if r["id"] is None:
            r["id"] = f"{path.stem}-{where.rsplit(' ', 1)[-1]}"
        records.append(r)
    if strict and not records:
        raise DataError(str(path), "the file contains no records.", "write at least one record.")
    return records if strict else (records, errors)


# --------------------------------------------------------------------------- datasets


def load_hf_dataset(
    dataset: Any,
    image_column: str | None = "image",
    conversations_column: str = "conversations",
    *,
    id_column: str | None = "id",
    split: str = "train",
    check_images: bool | str = True,
    strict: bool = True,
    require_answer: bool = True,
    limit: int | None = None,
) -> list[dict] | tuple[list[dict], list[DataError]]:
    """Adapt a Hugging Face ``datasets`` dataset into mmkit's normalised records.

    The image column may hold one PIL image, a list of them (multi-image), undecoded
    ``{"bytes", "path"}`` dicts, or paths; images stay in memory (PIL). The
    conversations column holds LLaVA turns (``from``/``value``) or chat messages
    (``role``/``content``), or the same as a JSON string.

    ``dataset`` can be a ``datasets.Dataset``, a ``DatasetDict`` (``split`` is taken),
    or a hub name / local path passed to ``datasets.load_dataset`` (the only case
    that may use the network, because you asked for it by name).
    """
    try:
        import datasets  # noqa: F401  (lazy: an optional dependency)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_hf_dataset needs the `datasets` package: pip install 'mmkit[data]'") from e
    name = "dataset"
    if isinstance(dataset, (str, Path)):
        name = str(dataset)
        dataset = datasets.load_dataset(str(dataset), split=split)
    elif isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(name, f"no split {split!r}; the DatasetDict has {list(dataset)}.",
                            f"pass split= one of {list(dataset)}.")
        dataset = dataset[split]
    cols = list(dataset.column_names)
    for c in (conversations_column, image_column):
        if c is not None and c not in cols:
            raise DataError(name, f"column {c!r} not found; columns are {cols}.",
                            "pass image_column=... / conversations_column=... with the right names "
                            "(image_column=None for a text-only dataset).")
    if id_column is not None and id_column not in cols:
        id_column = None

    records: list[dict] = []
    errors: list[DataError] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        row = dataset[i]
        rec: dict[str, Any] = {"conversations": row[conversations_column]}
        rec["id"] = row[id_column] if id_column else str(i)
        if image_column is not None and row[image_column] is not None:
            img = row[image_column]
            rec["images" if isinstance(img, (list, tuple)) else "image"] = img
        try:
            records.append(validate_record(rec, where=f"{name} row {i}", image_folder=None,
                                           check_images=check_images, require_answer=require_answer))
        except DataError as e:
            if strict:
                raise
            errors.append(e)
    return records if strict else (records, errors)


def load_records(source: str | Path, image_folder: str | Path | None = None, **options: Any) -> list[dict]:
    """One entry point for a training stage's ``data``:

    * ``"hf:NAME"`` -> a hub dataset by name (``load_hf_dataset``; needs the network once),
    * a folder written by ``datasets.Dataset.save_to_disk`` -> that dataset, offline,
    * a ``.json`` / ``.jsonl`` file -> ``load_conversations(source, image_folder)``.

    ``options`` go to ``load_hf_dataset`` (``image_column``, ``conversations_column``,
    ``split``, ``limit``, ...) or ``load_conversations`` (``check_images``).
    """
    text = str(source)
    path = Path(text).expanduser()
    if text.startswith("hf:"):
        return load_hf_dataset(text[3:], **options)
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                or (path / "state.json").is_file()):
            raise DataError(text, "is a folder but not a saved `datasets` dataset.",
                            "pass a .json/.jsonl conversation file, a folder written by "
                            "Dataset.save_to_disk, or hf:NAME for a hub dataset.")
        import datasets

        return load_hf_dataset(datasets.load_from_disk(str(path)), **options)
    return load_conversations(path, image_folder, **options)


def iter_texts(records: Iterable[dict]) -> Iterable[str]:
    """All turn texts of normalised records (handy to train a tokenizer on them)."""
    for r in records:
        for c in r["conversations"]:
            yield c["value"]
