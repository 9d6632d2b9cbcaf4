"""lorascope: show, measure and undo how fine-tuning changes a pretrained model."""

__version__ = "0.1.0"

# Imported eagerly on purpose: `scan` and `mitigate` share their names with their modules, and only
# binding them here, before anything else can import the submodules, keeps `lorascope.scan(...)` and
# `lorascope.mitigate(...)` the functions.
from lorascope.mitigate import mitigate as mitigate  # noqa: E402
from lorascope.scan import scan as scan  # noqa: E402
from lorascope.schema import MatrixRecord as MatrixRecord  # noqa: E402
from lorascope.schema import ScanResult as ScanResult

__all__ = ["MatrixRecord", "ScanResult", "__version__", "mitigate", "scan"]
