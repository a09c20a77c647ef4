"""The errors that mean bad input or an unusable environment (reported as one line, exit code 2), in one place."""

from quant_layers.attention import AttentionQuantError
from utils.data.architecture import ArchitectureError
from utils.data.calib_data import CalibDataError
from utils.run.cli import UsageError
from utils.run.fileio import WriteError
from utils.data.models import ModelLoadError
from utils.params import ParamFileError
from utils.quant_calib import CalibrationError
from utils.search.transforms import TransformError
from utils.data.task_data import TaskDataError
from utils.execution import ExecutionError
from utils.export import ExportError

USER_ERRORS = (UsageError, ModelLoadError, ParamFileError, CalibDataError, CalibrationError,
               TaskDataError, WriteError, TransformError, ArchitectureError, ExportError, AttentionQuantError,
               ExecutionError)
