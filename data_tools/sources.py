"""Read a dataset description (ImageFolder tree or CSV / JSONL manifest) into records.

Source kinds:

* **ImageFolder**: ``SRC/<class>/<image>`` (images may sit deeper inside a class folder).
  Every non-hidden sub-folder is a class, including empty ones, so indices follow the folder list.
* **CSV manifest** (``.csv``, with a header row) or **JSONL manifest** (``.jsonl`` / ``.ndjson``,
  one object per line). Columns: ``path`` (relative to the manifest's folder, or absolute) and
  either ``label`` (one class name or integer) or ``labels`` (several; a list in JSONL, separated
  by ``;`` or ``|`` in CSV) which makes the dataset multi-label. Every other column is carried
  into the sample's ``KEY.json``.

Class indices: names sorted as strings (ImageFolder folder names always, as torchvision does);
in a manifest where every label is a non-negative integer the integers ARE the indices
(``num_classes = max + 1``, names are their decimal strings).

Rows that cannot become a sample (no path, no label) are returned as skipped, not raised;
problems with the whole source (missing, unknown kind, no label column, nothing found) raise
:class:`UserError`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_CSV_LABEL_SEP = re.compile(r"[;|]")
_INT_LABEL = re.compile(r"^\d+$")


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One source image: where it is, the name its key derives from, its labels and extras."""

    path: Path
    name: str
    labels: tuple[str, ...]
    extra: dict | None = None
    size: int | None = None
    mtime_ns: int | None = None


@dataclass
class SourceScan:
    """Everything the writer needs to plan: records, the class table, and rows already skipped."""

    records: list[SourceRecord]
    classes: list[str]
    multi_label: bool
    skipped: list[dict] = field(default_factory=list)

    @functools.cached_property
    def class_to_idx(self) -> dict[str, int]:
        """Built once (planning asks for every record; ImageNet-21k has 21,841 classes); the class
        list is not changed after a scan (:func:`with_class_table` makes a new scan)."""
        return {name: i for i, name in enumerate(self.classes)}

    def label_indices(self, record: SourceRecord) -> list[int]:
        table = self.class_to_idx
        return sorted({table[name] for name in record.labels})


def _stat(path: Path) -> tuple[int | None, int | None]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _record(path: Path, name: str, labels: tuple[str, ...], extra: dict | None = None) -> SourceRecord:
    size, mtime = _stat(path)
    return SourceRecord(path=path, name=name, labels=labels, extra=extra or None, size=size, mtime_ns=mtime)


def _class_table(records: list[SourceRecord], declared: list[str] | None = None) -> list[str]:
    names = set(declared or []) | {name for r in records for name in r.labels}
    if names and all(_INT_LABEL.match(n) for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(names)


def _canonical_label(value: object) -> str:
    text = str(value).strip()
    return str(int(text)) if _INT_LABEL.match(text) else text


def scan_image_folder(root: Path) -> SourceScan:
    """Records for ``root/<class>/**/<image>``, sorted by relative path."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders; an ImageFolder source needs "
                        f"{root}/<class name>/<image>, or pass a CSV/JSONL manifest instead.")
    records: list[SourceRecord] = []
    for class_dir in class_dirs:
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith(".") or Path(fname).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                path = Path(dirpath) / fname
                records.append(_record(path, path.relative_to(root).as_posix(), (class_dir.name,)))
    records.sort(key=lambda r: r.name)
    classes = sorted(d.name for d in class_dirs)
    return SourceScan(records=records, classes=classes, multi_label=False)


def _label_mode(columns: list[str], manifest: Path) -> str:
    if "path" not in columns:
        raise UserError(f"manifest {manifest} has no 'path' column (found: {', '.join(columns) or 'none'}); "
                        "add a 'path' column with image paths relative to the manifest's folder.")
    if "label" in columns and "labels" in columns:
        raise UserError(f"manifest {manifest} has both 'label' and 'labels' columns; keep 'label' for "
                        "single-label data or 'labels' for multi-label data, not both.")
    if "labels" in columns:
        return "labels"
    if "label" in columns:
        return "label"
    raise UserError(f"manifest {manifest} has no 'label' or 'labels' column (found: {', '.join(columns)}); "
                    "add 'label' (one class per image) or 'labels' (several, ';'-separated in CSV).")


def _rows_csv(manifest: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [(reader.line_num, {k.strip(): v for k, v in row.items() if k is not None})
                for row in reader]
    return columns, rows


def _rows_jsonl(manifest: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    rows = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{manifest} line {lineno} is not JSON ({err.msg}); each line of a JSONL "
                                "manifest must be one object like {\"path\": ..., \"label\": ...}.") from None
            if not isinstance(obj, dict):
                raise UserError(f"{manifest} line {lineno} is a {type(obj).__name__}, not an object; write "
                                "one {\"path\": ..., \"label\": ...} object per line.")
            rows.append((lineno, obj))
    columns = list(rows[0][1]) if rows else []
    return columns, rows


def _split_labels(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else _CSV_LABEL_SEP.split(str(value))
    return tuple(_canonical_label(v) for v in items if str(v).strip())


def scan_manifest(manifest: Path) -> SourceScan:
    """Records for every usable row of a CSV or JSONL manifest, in manifest order."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        columns, rows = _rows_csv(manifest)
    elif suffix in (".jsonl", ".ndjson"):
        columns, rows = _rows_jsonl(manifest)
    else:
        raise UserError(f"{manifest} is neither a folder nor a .csv / .jsonl manifest; pass an ImageFolder "
                        "directory or a manifest file ending in .csv or .jsonl.")
    if not rows:
        raise UserError(f"manifest {manifest} has no rows; add one row per image.")
    mode = _label_mode(columns, manifest)
    base = manifest.parent
    records, skipped = [], []
    for lineno, row in rows:
        where = f"{manifest.name} line {lineno}"
        raw_path = str(row.get("path") or "").strip()
        if not raw_path:
            skipped.append({"path": where, "reason": "manifest row has no path"})
            continue
        path = Path(raw_path) if os.path.isabs(raw_path) else base / raw_path
        value = row.get(mode)
        if mode == "labels":
            labels = _split_labels(value) if value is not None else None
        else:
            labels = (_canonical_label(value),) if value is not None and str(value).strip() else None
        if labels is None:
            skipped.append({"path": str(path), "reason": f"{where} has no '{mode}'"})
            continue
        extra = {k: v for k, v in row.items() if k not in ("path", "label", "labels")}
        records.append(_record(path, raw_path.lstrip("/\\"), labels, extra))
    return SourceScan(records=records, classes=_class_table(records), multi_label=mode == "labels",
                      skipped=skipped)


def with_class_table(scan: SourceScan, classes: list[str], origin: Path) -> SourceScan:
    """``scan`` indexed by the given class table (another shard set's), so that index i means the
    same class in both sets; a source class the table lacks is a :class:`UserError`."""
    known = set(classes)
    unknown = sorted({name for r in scan.records for name in r.labels} - known)
    if unknown:
        raise UserError(f"--classes {origin}: the source has {len(unknown)} classes that table lacks, e.g. "
                        f"{unknown[0]!r}; give the table of the set these classes come from")
    return SourceScan(records=scan.records, classes=list(classes), multi_label=scan.multi_label,
                      skipped=scan.skipped)


def scan_source(src: Path) -> SourceScan:
    """Dispatch on the kind of ``src``; raise :class:`UserError` if it is missing or yields nothing."""
    if not src.exists():
        raise UserError(f"source {src} does not exist; pass an ImageFolder directory or a .csv / .jsonl "
                        "manifest.")
    scan = scan_image_folder(src) if src.is_dir() else scan_manifest(src)
    if not scan.records:
        found = f" ({len(scan.skipped)} manifest rows were unusable)" if scan.skipped else ""
        raise UserError(f"no images found in {src}{found}; image files need one of the suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))} (ImageFolder) or usable manifest rows.")
    return scan
