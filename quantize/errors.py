"""Library exceptions. The CLI maps each to an exit code; library code never exits."""


class QuantizeError(Exception):
    """Base class: a problem the user can fix (bad recipe, model, data or request)."""

    exit_code = 2


class RecipeError(QuantizeError):
    """The recipe file is missing, not YAML, or breaks the schema."""


class ModelError(QuantizeError):
    """The model cannot be found, is not Gemma 3n, or is in a refused format."""


class PlanError(QuantizeError):
    """The recipe and the model disagree (e.g. conflicting K/V schemes in a sharing group)."""


class ExportError(QuantizeError):
    """An export format cannot represent what was asked (the message names the tensor or key)."""
