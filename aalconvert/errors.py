"""The few exception types users may catch."""


class AALConvertError(Exception):
    """Base class for every error aalconvert raises on purpose."""


class ConversionError(AALConvertError, ValueError):
    """A model, rule or option cannot be converted as asked; the message says what to do."""


class SavedTensorModifiedError(AALConvertError, RuntimeError):
    """A tensor saved for backward (an input or an ARA anchor) was modified in place."""


class WiringError(AALConvertError, RuntimeError):
    """A converted layer ran without the tensor its wiring carries (e.g. an ARA anchor)."""
