"""Dataset validation for the `datasets.validate` job: a library with no database, web or queue.

`validate_upload(upload, dataset_dir)` extracts an uploaded archive safely (`archive`), reads
its labels (`layout`), checks every image with the engine's readers (`images`, through the one
coupling module `engine`) and returns a `DatasetReport`: ready, with classes, counts, image
statistics, the split and thumbnails; or invalid, with every `Problem` (path, code, message,
hint). Limits are a `DatasetLimits` dataclass. docs/datasets.md is the user-facing description.
"""

from .archive import Extracted, archive_kind, extract_archive
from .limits import DatasetLimits
from .problems import HINTS, ArchiveRefused, Problem, ValidationCancelled
from .validate import DatasetReport, validate_folder, validate_upload

__all__ = [
    "HINTS",
    "ArchiveRefused",
    "DatasetLimits",
    "DatasetReport",
    "Extracted",
    "Problem",
    "ValidationCancelled",
    "archive_kind",
    "extract_archive",
    "validate_folder",
    "validate_upload",
]
