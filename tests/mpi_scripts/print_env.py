"""Print this rank's discovered environment as `RESULT {json}` (no torch: quick to start)."""
import dataclasses
import json

from hpctrain.dist.env import discover

print("RESULT " + json.dumps(dataclasses.asdict(discover())), flush=True)
