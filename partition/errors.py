"""Exceptions for mistakes a user can cause; the CLI shows each as one line."""


class EdgesplitError(Exception):
    """Base of every error the user can fix; its message is one sentence saying what to do."""


class ModelLoadError(EdgesplitError):
    """The model file is missing, of the wrong kind, truncated or corrupt."""


class ExportError(ModelLoadError):
    """torch.export could not trace a module or a stage."""


class ClusterSpecError(EdgesplitError):
    """nodes.yaml is malformed; the message names the field's path and the bad value."""


class ProfileMismatchError(EdgesplitError):
    """A profile file belongs to another model, granularity or torch version."""


class ProfileFormatError(EdgesplitError):
    """A profile file is unreadable, malformed or of an unsupported version."""


class ModelMismatchError(EdgesplitError):
    """A model file is not the one a plan was made for, or no longer has the plan's layers."""


class PlanningError(EdgesplitError):
    """No plan can be made."""


class NoFeasiblePlanError(PlanningError):
    """Every assignment of layers to nodes breaks a memory limit."""


class AccuracyBudgetError(PlanningError):
    """A compressed plan's measured output error exceeds ``--max-error``."""


class PlanFormatError(EdgesplitError):
    """plan.json is unreadable or of an unsupported schema version."""


class TensorSpecError(EdgesplitError):
    """A tensor does not match the name, dtype or shape a stage expects."""


class EncodingError(EdgesplitError):
    """A compressed tensor's bytes are malformed: wrong length, encoding or parameters."""
