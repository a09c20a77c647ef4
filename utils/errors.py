"""The errors that mean bad input or an unusable environment (reported as one line, exit code 2), in one place."""

from utils.calib_data import CalibDataError
from utils.cli import UsageError
from utils.fileio import WriteError
from utils.models import ModelLoadError
from utils.params import ParamFileError
from utils.quant_calib import CalibrationError
from utils.smoothquant import SmoothingError
from utils.task_data import TaskDataError

USER_ERRORS = (UsageError, ModelLoadError, ParamFileError, CalibDataError, CalibrationError,
               TaskDataError, WriteError, SmoothingError)
