"""Exports of finished runs in the formats training code reads: COCO, mmsegmentation, Hugging Face."""

from magicseg_engine.formats.export import FORMATS, ExportJob, ExportSummary, export_run, prepare_export

__all__ = ["FORMATS", "ExportJob", "ExportSummary", "export_run", "prepare_export"]
