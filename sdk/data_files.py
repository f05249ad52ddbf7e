"""The dataset files as the `skillbank data` tools read them: grounding_dino.formats (the readers the training
pipeline and preflight use too), with every problem reported as a DataToolError that names the file and the place."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Union

from grounding_dino.formats import FormatError
from sdk.errors import SkillBankError

PathLike = Union[str, Path]


class DataToolError(SkillBankError):
    """A dataset file the tools cannot read; the message names the file, the record and the fix."""


@contextmanager
def reading(path: PathLike) -> Iterator[None]:
    """Around the grounding_dino.formats readers of `path` (an ODVG loop included): their errors as DataToolError."""
    try:
        yield
    except FileNotFoundError:
        raise DataToolError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DataToolError(f"{path} is a folder; expected an annotation file") from None
    except OSError as e:
        raise DataToolError(f"{path}: cannot read it ({e.strerror or e})") from None
    except FormatError as e:
        raise DataToolError(str(e)) from None


def detection_label(instance: Dict[str, Any], names: Dict[int, str], from_map: bool, where: str) -> int:
    """The instance's label, checked against the label map, or, without one, named by its 'category' (which
    `names` collects, and which must name a label the same way every time)."""
    label = instance["label"]
    if from_map:
        if label not in names:
            raise DataToolError(f"{where}: label {label} is not in the label map (labels {sorted(names)})")
        return label
    category = instance.get("category")
    if not isinstance(category, str) or not category.strip():
        raise DataToolError(f"{where}: no label map was given and the instance has no 'category' name; pass the "
                            "<name>_odvg_labelmap.json file")
    if names.setdefault(label, category) != category:
        raise DataToolError(f"{where}: label {label} is named {category!r} here but {names[label]!r} before; "
                            "pass the label map")
    return label
