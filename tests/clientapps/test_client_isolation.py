"""The client never imports the server: a ClientApp's train call in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import flwr.clientapp  # Flower's client side imports some of flwr.serverapp itself
flower_own = {m for m in sys.modules if m.startswith("flwr.serverapp")}
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
from bouquet.clientapps.app import app
from bouquet.tasks import DataSpec, build_model, dataset_info, wire

spec = DataSpec(dataset="digits", partitioner="iid", num_partitions=2)
model = build_model("mlp", dataset_info(spec), seed=0)
config = ConfigRecord({
    wire.ROUTINE: "momentum", "momentum.beta": 0.5, "momentum.scaffold": True,
    "momentum.vr": False, wire.LOCAL_STEPS: 2, wire.SERVER_ROUND: 1, wire.SEED: 3,
})
msg = Message(
    RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: config}),
    dst_node_id=1, message_type=MessageType.TRAIN,
)
msg.metadata.__dict__["_message_id"] = "m1"
context = Context(
    run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
    state=RecordDict(), run_config={"dataset": "digits", "partitioner": "iid"},
)
reply = app(msg, context)
print(json.dumps({
    "error": reply.error.reason if reply.has_error() else None,
    "routine": reply.content[wire.CLIENT_INFO][wire.ROUTINE] if reply.has_content() else None,
    "records": sorted(reply.content.array_records) if reply.has_content() else [],
    "bouquet_server": sorted(
        m for m in sys.modules
        if m == "bouquet.strategies" or m.startswith(("bouquet.strategies.", "bouquet.serverapps"))
    ),
    "extra_flower_server": sorted(
        {m for m in sys.modules if m.startswith("flwr.serverapp")} - flower_own
    ),
}))
"""


def test_a_train_call_imports_nothing_of_the_server_side(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BOUQUET_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is None
    assert result["routine"] == "momentum"
    assert result["records"] == ["arrays", "momentum.dc"]
    assert result["bouquet_server"] == []
    assert result["extra_flower_server"] == []
