"""Shared helpers of the CGGR benchmarks: one timing method (:mod:`.timing`), one record schema and results
layout (:mod:`.records`), the run's environment (:mod:`.env`), the conversion of each op script's own JSON
into records (:mod:`.convert`), and the one place that imports package internals (:mod:`.compat`)."""
from benchmarks.harness.records import RunContext, load_records, make_record, run_dir, write_records
from benchmarks.harness.timing import Timing, measure, ratio, ratios, summarize, throughput

__all__ = ["Timing", "measure", "summarize", "ratio", "ratios", "throughput", "RunContext", "make_record",
           "run_dir", "write_records", "load_records"]
