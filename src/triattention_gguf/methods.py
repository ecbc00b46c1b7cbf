"""The compression methods and select modes by name, as the C API numbers them (cpp/triattention.h).
No imports: the command line lists them without loading the library."""

METHODS = {"none": 0, "tri": 1, "streaming": 2, "knorm": 3, "random": 4, "snapkv": 5}
SELECT_MODES = {"per-head": 0, "shared": 1, "per-layer-head": 2}
MAX_HORIZON = 65536  # tri's largest future offset, the reference's 2^16 (cpp/triattention.h); the default
# tri scores a (layer, KV head) whose queries are spread out (mean calibrated concentration R below
# this) by recency and the attention its latest queries gave (cpp/triattention.h); by default none,
# as the reference: BENCHMARKS.md, "Spread heads", has the evals (it helps SmolLM2, costs Qwen2.5)
MIN_CONCENTRATION = 0.0
MAX_CLUSTERS = 64  # query clusters per head at most (cpp/triattention.h)
# embed-centers' query clusters per head (1: the centre alone, as the paper). 8 keep as much as 16
# and more than 1 on every cell measured, at 1.2x the compression time (BENCHMARKS.md, "Query clusters")
DEFAULT_CLUSTERS = 8
DEFAULT_SELECT = "per-layer-head"  # the reference's mode; BENCHMARKS.md has the evals that chose it
# the settings `tune` chooses among for tri, as method specs (harness.py): the reference's first, then
# the window + short horizon and the spread-heads rule that kept more of SmolLM2 and less of Qwen2.5
# (BENCHMARKS.md); the one measured to keep clearly the most of a model is stored in its file
TUNED_SPECS = ("tri", "tri+recent+horizon4", "tri+recent+horizon4+conc0.68")
