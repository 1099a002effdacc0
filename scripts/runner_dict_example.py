"""xDiT's model runner driven from Python by a config dict, with STADI switched on by its keys.

    HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 stadi-xdit --nproc_per_node 2 scripts/runner_dict_example.py \
        --output_directory /tmp/out

(docs/deployment.md, section 0, form 2; `/tmp/hf` is the tiny offline cache of
`python -m stadi_xdit.offline.hub_cache`.) The runner's own call sequence, as `xfuser/runner.py` runs it.
"""

import os
import sys

import stadi_xdit.xdit  # noqa: F401  (the plugin, before anything from xfuser)

# isort: split
from xfuser.config import FlexibleArgumentParser, xFuserArgs
from xfuser.runner import xFuserModelRunner

# Every runner key at its default, as the `xdit` command parses them (here with this script's own
# arguments, e.g. --output_directory): the runner reads keys such as "seed" that a hand-written dict
# would miss (KeyError).
argv = ["--model", "FLUX.1-dev", *sys.argv[1:]]
defaults = vars(xFuserArgs.add_runner_args(FlexibleArgumentParser()).parse_args(argv))
config = {**defaults, "use_stadi": True, "stadi_mode": "full", "stadi_degree": 2, "stadi_emulate_slowdown": "1,2",
          "height": 256, "width": 256, "num_inference_steps": 10, "warmup_steps": 2, "max_sequence_length": 16,
          "prompt": ["a lighthouse"]}
os.makedirs(config["output_directory"], exist_ok=True)  # the runner saves there after the run

runner = xFuserModelRunner(config)  # a misspelled stadi_* key or a bad value: StadiInputError (a ValueError)
input_args = runner.preprocess_args(config)
runner.initialize(input_args)
output, timings = runner.run(input_args)
runner.save(output=output, timings=timings)  # on the last rank: the image and timings.json
runner.cleanup()
