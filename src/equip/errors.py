"""The one exception type users see: a message that names the key or file and the fix."""


class EquipError(Exception):
    """Bad input (config, data, tracking). Raised before training wherever it can be detected."""

    exit_code = 2  # bad input


class StoreUnavailable(EquipError):
    """The tracking store went away (or never answered): a sweep stops instead of failing every
    job that is left; the same command resumes it once the store is back."""


class TrainingFailed(EquipError):
    """Training went wrong in a way its message explains and a setting fixes (the loss became
    NaN): the run exists and ends FAILED; one line, exit 1 (not 2: a run was created)."""

    exit_code = 1


class JobFailed(EquipError):
    """A sweep job on a cluster failed and the sweep was told to stop there
    (multirun.continue_on_failure=false): one line with where its logs are, exit 1."""

    exit_code = 1
