"""Pins: a rebalance plan's target nodes, carried by the scale command (api), handed to the
scheduler once per generation (deployer), and kept there only while the node still keeps
every hard rule and has room (scheduler)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.schemas.envelope import CloudEvent
from corral.schemas.errors import InvalidInput
from corral.schemas.spec import Affinity, ServiceSpec
from corral.schemas.state import Assignment, ServiceRecord, Template
from corral.workers.api.applying import Command, apply, parse_command
from corral.workers.deployer.planning import pinned_nodes
from corral.workers.scheduler.pinning import place_pinned
from corral.workers.scheduler.placement import ClassRequest, NodeTable, NodeView

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def view(
    id_: str, services: dict[str, int] | None = None, cpu: float = 4.0, *, ready: bool = True
) -> NodeView:
    services = services or {}
    return NodeView(
        id=id_,
        labels={"zone": "a"},
        capacity={"cpu": cpu},
        allocated={"cpu": float(sum(services.values()))},
        services=services,
        total=sum(services.values()),
        ready=ready,
    )


WEB = ClassRequest(count=0, service="web", resources={"cpu": 1.0})


# --- the scheduler's check --------------------------------------------------------------------


def test_pins_that_fit_are_kept_and_committed_one_after_another() -> None:
    table = NodeTable.build([view("n0", {"web": 1}, cpu=3.0), view("n1")])
    pinned = place_pinned(table, WEB, [("r1", "n0"), ("r2", "n0"), ("r3", "n0"), ("r4", "n1")])
    assert [(r, n) for r, n, _ in pinned.kept] == [("r1", "n0"), ("r2", "n0"), ("r4", "n1")]
    assert pinned.kept[0][2] == "rebalance: on n0 as planned, 2 of this service there"
    assert pinned.kept[1][2] == "rebalance: on n0 as planned, 3 of this service there"
    # n0 had room for two: the third pin saw the first two
    assert pinned.refused == {"r3": "planned node n0 no longer fits (lacks cpu)"}
    assert table.counts("web").tolist() == [3, 1]
    assert table.used("cpu").tolist() == [3.0, 1.0]


@pytest.mark.parametrize(
    ("request_", "node", "why"),
    [
        (WEB, view("n0", ready=False), "not ready"),
        (
            ClassRequest(
                count=0, service="web", resources={"cpu": 1.0}, node_selector={"disk": "ssd"}
            ),
            view("n0"),
            "fails node_selector",
        ),
        (
            ClassRequest(
                count=0,
                service="web",
                resources={"cpu": 1.0},
                node_affinity=(Affinity(key="zone", operator="In", values=["b"]),),
            ),
            view("n0"),
            "fails node_affinity",
        ),
        (
            ClassRequest(count=0, service="web", resources={"cpu": 1.0}, avoid=("db",)),
            view("n0", {"db": 1}),
            "runs a service it avoids",
        ),
        (
            ClassRequest(count=0, service="web", resources={"cpu": 1.0}, max_per_node=2),
            view("n0", {"web": 2}),
            "already holds max_per_node=2",
        ),
        (
            ClassRequest(count=0, service="web", resources={"gpu": 1.0}),
            view("n0"),
            "lacks gpu",
        ),
        (
            ClassRequest(count=0, service="web", driver="docker"),
            view("n0"),
            "lacks the docker driver",
        ),
    ],
)
def test_a_pin_that_breaks_a_hard_rule_is_refused_with_the_rule(
    request_: ClassRequest, node: NodeView, why: str
) -> None:
    table = NodeTable.build([node, view("n1")])
    pinned = place_pinned(table, request_, [("r1", "n0")])
    assert pinned.kept == []
    assert pinned.refused == {"r1": f"planned node n0 no longer fits ({why})"}
    assert table.counts("web").tolist() == [node.services.get("web", 0), 0]


def test_a_pin_to_a_node_that_left_is_refused() -> None:
    pinned = place_pinned(NodeTable.build([view("n0")]), WEB, [("r1", "n9")])
    assert pinned.refused == {"r1": "planned node n9 is gone"}


# --- the deployer: each pin once per generation --------------------------------------------


def record(generation: int, place_on: list[str]) -> ServiceRecord:
    spec = ServiceSpec.model_validate({"name": "web", "command": ["serve"], "replicas": 4})
    return ServiceRecord(
        spec=spec, generation=generation, command_id="c", updated_at=T0, place_on=place_on
    )


def assign(replica: str, node: str, generation: int) -> Assignment:
    return Assignment(
        replica=replica,
        service="web",
        node=node,
        generation=generation,
        template=Template.from_spec(record(1, []).spec),
        assigned_at=T0,
    )


def test_pins_are_used_once_by_this_generations_replicas() -> None:
    pins = ["b0", "b1", "b0"]
    older = [assign("r1", "b0", 1), assign("r2", "b1", 1)]
    assert pinned_nodes(record(2, pins), older) == pins  # older replicas use no pin
    landed = [*older, assign("r3", "b0", 2)]
    assert pinned_nodes(record(2, pins), landed) == ["b1", "b0"]
    fell_back = [*landed, assign("r4", "c0", 2)]  # its pin (b1) is still there to retry
    assert pinned_nodes(record(2, pins), fell_back) == ["b1", "b0"]
    assert pinned_nodes(record(2, []), landed) == []


# --- the api: a scale-out carries pins, everything after clears them -----------------------


def cmd(verb: str, data: Any, id_: str) -> Command:
    event = CloudEvent(id=id_, source="tests", type=f"io.corral.service.{verb}", data=data)
    return parse_command("service", "web", verb, event)


def test_a_scale_out_keeps_its_pins_and_the_next_generation_drops_them() -> None:
    deployed = apply(cmd("deploy", {"command": ["x"], "replicas": 2}, "d1"), None, T0).record
    out = apply(cmd("scale", {"replicas": 4, "place_on": ["b0", "b1"]}, "s1"), deployed, T0)
    assert out.record.place_on == ["b0", "b1"]
    back = apply(cmd("scale", {"replicas": 2, "prefer_remove": ["web-a"]}, "s2"), out.record, T0)
    assert back.record.place_on == []
    later = T0 + timedelta(seconds=1)
    redeploy = apply(cmd("deploy", {"command": ["y"], "replicas": 4}, "d2"), out.record, later)
    assert redeploy.record.place_on == []


def test_a_scale_in_ignores_pins() -> None:
    deployed = apply(cmd("deploy", {"command": ["x"], "replicas": 3}, "d1"), None, T0).record
    down = apply(cmd("scale", {"replicas": 2, "place_on": ["b0"]}, "s1"), deployed, T0)
    assert down.record.place_on == []


def test_pins_are_validated() -> None:
    with pytest.raises(InvalidInput, match="place_on names 3 nodes for 2 replicas"):
        cmd("scale", {"replicas": 2, "place_on": ["a", "b", "c"]}, "s1")
    with pytest.raises(InvalidInput) as info:
        cmd("scale", {"replicas": 2, "place_on": [""]}, "s1")
    assert [e.loc for e in info.value.errors] == ["place_on.0"]


# --- the CLI's report: which planned targets the surge missed --------------------------------


def test_the_report_pairs_each_missed_target_with_where_its_replica_went() -> None:
    from corral.services.cli.moving import _missed

    fell_back = "planned node b0 no longer fits (lacks cpu); placed by the usual rules: spread"
    landed = [("b1", "rebalance: on b1 as planned"), ("c0", fell_back)]
    assert _missed(["b0", "b1"], landed) == [{"planned": "b0", "node": "c0", "why": fell_back}]
    assert _missed(["b0", "b0"], [("b0", "x"), ("b0", "y")]) == []
    assert _missed([], [("b0", "x")]) == []


def test_the_table_says_where_it_searched_and_which_targets_were_missed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from corral.services.cli.rebalance import print_view

    move = {"service": "web", "replica": "web-1", "from": "a0", "to": "b0", "why": "spread"}
    applied = {
        "service": "web",
        "started": {"web-9": "b1"},
        "stopped": {"web-1": "a0"},
        "missed": [{"planned": "b0", "node": "b1", "why": "planned node b0 is gone; ..."}],
    }
    print_view({"budget": 5, "moves": [move], "searched": "ray: 2 shards", "applied": [applied]})
    out = capsys.readouterr().out
    assert "searched on ray: 2 shards" in out
    assert "web: started web-9 on b1; then stopped web-1 on a0" in out
    assert "not on b0 as planned: started on b1 instead (planned node b0 is gone; ...)" in out
    print_view({"budget": 5, "moves": [], "searched": "in process (Ray failed: OSError: x)"})
    captured = capsys.readouterr()
    assert "warning: searched in process (Ray failed: OSError: x)" in captured.err
    assert "nothing to move" in captured.out
