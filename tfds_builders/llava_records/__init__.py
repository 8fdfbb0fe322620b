"""The ``llava_records`` TFDS builder (see ``llava_records.py`` for usage)."""

from .llava_records import (
  BuildReport,
  LlavaRecords,
  LlavaRecordsConfig,
  SkippedRecord,
  SplitCounts,
  decode_example,
  encode_record,
)

__all__ = [
  "BuildReport",
  "LlavaRecords",
  "LlavaRecordsConfig",
  "SkippedRecord",
  "SplitCounts",
  "decode_example",
  "encode_record",
]
