"""Video input and dense-vs-eventful comparison on real clips."""

from frugalvit.video.compare import ComparisonSummary, FrameRecord, compare_on_frames, summarize, time_repeats
from frugalvit.video.decode import BUNDLED_CLIPS, bundled_clip_path, read_frames, resolve_clip

__all__ = ["BUNDLED_CLIPS", "ComparisonSummary", "FrameRecord", "bundled_clip_path", "compare_on_frames",
           "read_frames", "resolve_clip", "summarize", "time_repeats"]
