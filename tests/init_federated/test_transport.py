"""The federated init over MQTT: the same bits as in process, only sketches on the wire, a
killed `fedsb aggregator` that restarts its init phase cleanly, chunked replies."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import torch
from conftest import tiny_job
from mqtt.helpers import Procs, aggregator_args, read_json, wait_until, write_job
from safetensors.torch import load_file

from fedsb.aggregator import init_service
from fedsb.aggregator.broker import BrokerHandle, start_embedded_broker
from fedsb.aggregator.init_service import InitService
from fedsb.aggregator.server import FederatedServer
from fedsb.aggregator.service import AggregatorService
from fedsb.cli import guarded, run_simulation
from fedsb.config import JobConfig, parse_config
from fedsb.edge_client.service import ClientService
from fedsb.init_federated import EXACT, SKETCH, sketch_columns
from fedsb.methods import get_method
from fedsb.mqtt import MqttConnection, parse_broker_url
from fedsb.protocol import parse_chunk, split_into_chunks
from fedsb.wire import decode_update

from .helpers import build, federated_job

JOB_S = 180.0


Spied = list[tuple[str, bytes]]  # (topic, payload) of the messages a spy received


class InitSpy:
    """A clean-session subscriber recording every message under `fedsb/{job}/init/`."""

    def __init__(self, handle: BrokerHandle, job: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.paho = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="init-spy")
        self.paho.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))
        subscribed: queue.Queue[object] = queue.Queue()
        self.paho.on_subscribe = lambda *_args: subscribed.put(True)
        self.paho.connect(handle.host, handle.port, keepalive=30)
        self.paho.loop_start()
        self.paho.subscribe(f"fedsb/{job}/init/#", qos=1)
        subscribed.get(timeout=10)

    def close(self) -> Spied:
        """Stop listening (after the last deliveries); what was received."""
        time.sleep(0.5)
        self.paho.disconnect()
        self.paho.loop_stop()
        return [self.messages.get() for _ in range(self.messages.qsize())]


def replies(spied: Spied) -> list[tuple[str, dict[str, torch.Tensor], dict[str, str], int]]:
    """(topic client, tensors, metadata, bytes) of every reply, reassembled from its chunks."""
    chunks: dict[str, dict[int, bytes]] = defaultdict(dict)
    out = []
    for topic, payload in spied:
        if "/init/reply/" not in topic:
            continue
        client = topic.rsplit("/", 1)[1]
        index, total, data = parse_chunk(payload)
        chunks[client][index] = data
        if len(chunks[client]) == total:
            whole = b"".join(chunks.pop(client)[i] for i in range(total))
            state, meta = decode_update(whole)
            out.append((client, state, meta, len(whole)))
    assert not chunks  # no reply left half-sent
    return out


def sketch_init_both_ways(
    tiny_config: Any, tmp_path: Path, clients: int, rounds: int, samples: int
) -> tuple[JobConfig, dict[str, Any], dict[str, Any], Spied, list[str]]:
    """A sketch-init job in process and over an embedded broker: (job, in process, over MQTT,
    the init messages of the MQTT run, the init topics still retained after it)."""
    raw_job = tiny_config(clients=clients, rounds=rounds).model_dump(mode="json")
    raw_job["adapter"] |= {"init": SKETCH, "init_samples": samples}
    job = parse_config(raw_job)
    inproc = run_simulation(job, tmp_path / "inproc", transport="inproc", quiet=True)
    with start_embedded_broker() as broker:
        spy = InitSpy(broker, job.name)
        try:
            over_mqtt = run_simulation(
                job, tmp_path / "mqtt", transport="mqtt", broker_url=broker.url, quiet=True
            )
        finally:
            spied = spy.close()
        retained = still_retained(broker, job.name)
    final = inproc["final_state"]
    assert all(torch.equal(final[k], over_mqtt["final_state"][k]) for k in final)
    assert inproc["init_traffic"] == over_mqtt["init_traffic"]
    return job, inproc, over_mqtt, spied, retained


def still_retained(broker: BrokerHandle, job: str, wait_s: float = 10.0) -> list[str]:
    """Topics under `fedsb/{job}/init/` with a retained message, as late subscribers see them
    (asked again for up to `wait_s`: the broker may acknowledge a clear before applying it)."""
    deadline = time.monotonic() + wait_s
    while True:
        topics = [topic for topic, payload in InitSpy(broker, job).close() if payload]
        if not topics or time.monotonic() > deadline:
            return topics


def test_mqtt_federation_matches_inproc_and_only_sketches_travel(tiny_config, tmp_path):
    job, inproc, over_mqtt, spied, _ = sketch_init_both_ways(tiny_config, tmp_path, 3, 2, 24)
    assert inproc["accuracy_before"] == over_mqtt["accuracy_before"]
    assert inproc["accuracy_after"] == over_mqtt["accuracy_after"]
    assert over_mqtt["init_traffic"]["init_rejections"] == {}

    hidden, inter = 32, 64  # the tiny BERT's widths; r + oversample = 12 sketch columns
    cols = job.adapter.rank + job.adapter.init_oversample
    sent = replies(spied)
    assert sorted((m["client"], m["pass"]) for _, _, m, _ in sent) == [
        (f"client-{i:04d}", p) for i in range(3) for p in "01"
    ]
    for client, state, meta, _ in sent:
        assert meta["client"] == client and meta["kind"] == "init-reply"
        assert len(state) == 12  # 2 layers × 6 adapted matrices, nothing else
        for name, tensor in state.items():
            d_out = inter if name.endswith("intermediate.dense") else hidden
            d_in = inter if name.endswith("output.dense") and "attention" not in name else hidden
            k = sketch_columns(cols, d_out, d_in)
            assert tensor.dtype == torch.float32
            assert tuple(tensor.shape) == ((d_out, k) if meta["pass"] == "0" else (k, d_in))
    assert sum(size for *_, size in sent) == over_mqtt["init_traffic"]["init_upload_bytes"]


def test_a_request_in_many_chunks_gives_the_same_init_and_is_cleared_after(
    tiny_config, tmp_path, monkeypatch
):
    """The sketch's second request (its bases) goes out in 4 KiB chunks: the clients reassemble
    it and the result is the in-process one, bit for bit; afterwards nothing is retained."""
    monkeypatch.setattr(init_service, "REQUEST_CHUNK_BYTES", 4096)
    _, _, over_mqtt, spied, retained = sketch_init_both_ways(tiny_config, tmp_path, 2, 1, 16)
    indices: dict[int, set[int]] = defaultdict(set)  # chunk count → indices seen
    for topic, payload in spied:
        if "/init/request/" in topic and payload:
            index, total, _ = parse_chunk(payload)
            indices[total].add(index)
    assert over_mqtt["init_traffic"]["init_download_bytes_per_client"] > 2 * 4096
    assert any(total > 2 and seen == set(range(total)) for total, seen in indices.items())
    assert retained == []


def test_the_clean_up_clears_what_earlier_attempts_left(tiny_model_dir, tmp_path, monkeypatch):
    """Attempt 1 retains its request in 5 chunks and is killed; attempt 2 takes 1 chunk and is
    killed after its checkpoint, before its clean-up; a third start loads the checkpoint and
    clears the pointer and all 5 chunk topics (the most any attempt used is kept on disk)."""
    job = federated_job(tiny_model_dir, SKETCH, clients=2)

    def attempt(connection: MqttConnection, chunks: int) -> InitService:
        fed = build(job)
        size = len(fed.phase.request)
        monkeypatch.setattr(init_service, "REQUEST_CHUNK_BYTES", -(-size // chunks))
        server = FederatedServer.from_model(job, fed.model, get_method("fedsb"))
        return InitService(fed.phase, server, connection, tmp_path, 60.0)

    with start_embedded_broker() as broker:
        address = parse_broker_url(broker.url)
        connection = MqttConnection(address, "aggregator", [], clean_start=True).start()
        try:
            attempt(connection, 5).publish_request()
            assert len(still_retained(broker, job.name, wait_s=0)) == 1 + 5
            second = attempt(connection, 1)
            second.publish_request()
            second.traffic = {"init_clients": 2}
            second.save()
            third = attempt(connection, 1)
            assert third.load() and third.request_chunks == 5
            assert third.run(time.monotonic() + 10) == {"init_clients": 2}
            assert still_retained(broker, job.name) == []
        finally:
            connection.stop()


def test_aggregator_killed_during_init_restarts_it(tiny_model_dir, tmp_path, mosquitto_broker):
    """`fedsb aggregator` SIGKILLed in pass 0 (2 of 3 replies in): the restart redoes the phase."""
    raw = tiny_job(tiny_model_dir, clients=3, rounds=1)
    raw["adapter"] |= {"init": SKETCH, "init_samples": 24}
    config = write_job(tmp_path / "job.toml", raw)
    state_dir = tmp_path / "aggregator"
    agg = aggregator_args(config, mosquitto_broker.url, state_dir)
    address = parse_broker_url(mosquitto_broker.url)
    lock = threading.Lock()
    services = [
        ClientService(c, address, state_file=tmp_path / f"{c.client_id}.json", compute_lock=lock)
        for c in build(parse_config(raw)).clients
    ]
    errors: list[BaseException] = []
    threads = [threading.Thread(target=guarded(s.run, errors), daemon=True) for s in services]
    procs = Procs(tmp_path / "logs")
    spy = InitSpy(mosquitto_broker, "tiny")
    try:
        first = procs.start("aggregator-1", *agg)
        for t in threads[:2]:  # the quorum is 3: pass 0 cannot close yet
            t.start()
        replied: set[str] = set()

        def two_replies() -> bool:
            while not spy.messages.empty():
                topic, _ = spy.messages.get()
                if "/init/reply/" in topic:
                    replied.add(topic.rsplit("/", 1)[1])
            return len(replied) == 2

        wait_until(two_replies, 90, "two init replies", procs.report)
        first.kill(signal.SIGKILL)
        assert not (state_dir / "init.json").exists()  # nothing of the phase was kept

        second = procs.start("aggregator-2", *agg)
        threads[2].start()
        assert second.wait(time.monotonic() + JOB_S) == 0, procs.report()
        for t in threads:
            t.join(60)
        assert errors == [] and not any(t.is_alive() for t in threads)
    finally:
        for s in services:
            s.done = True  # ends a thread still waiting (bounded by its 0.5 s poll)
        spy.close()
        procs.close()

    log = second.stderr()
    assert "lora-sb-federated init: 2 passes over 3 clients" in log, log
    traffic = read_json(state_dir / "init.json")
    # a reply of the killed attempt that was not acknowledged comes back, and is refused
    assert set(traffic.pop("init_rejections")) <= {"stale-init"}
    assert traffic["init_clients"] == 3
    reference = run_simulation(parse_config(raw), tmp_path / "ref", transport="inproc", quiet=True)
    final = load_file(str(state_dir / "global-00001.safetensors"))
    assert sorted(final) == sorted(reference["final_state"])
    assert all(torch.equal(final[k], reference["final_state"][k]) for k in final)
    expected = {k: v for k, v in reference["init_traffic"].items() if k != "init_rejections"}
    assert traffic == expected

    # a third start finds the checkpointed init and the closed round: no init phase again
    job = parse_config(raw)
    fresh = build(job)
    server = FederatedServer.from_model(job, fresh.model, get_method("fedsb"))
    AggregatorService(job, server, address, state_dir, init_phase=fresh.phase)
    assert fresh.phase.done and server.round == 1
    initialised = load_file(str(state_dir / "init.safetensors"))
    assert all(torch.equal(server.adapter[k], initialised[k]) for k in initialised)
    assert all(torch.equal(server.broadcast[k], final[k]) for k in final)


def test_a_reply_in_many_chunks_is_reassembled_in_any_order(tiny_model_dir, tmp_path):
    fed = build(federated_job(tiny_model_dir, EXACT, clients=2))
    service = InitService(fed.phase, None, None, tmp_path, 60.0)  # type: ignore[arg-type]
    reply = fed.clients[0].init_reply(fed.phase.request)  # 66 KB: a full-weight upload
    chunks = split_into_chunks(reply, chunk_bytes=10_000)
    assert len(chunks) == 7
    got = [service.collect("client-0000", chunk) for chunk in reversed(chunks)]
    assert got == [None] * 6 + [reply]
    assert fed.phase.submit("client-0000", reply) is None
    corrupt = chunks[0][:-1] + bytes([chunks[0][-1] ^ 1])
    assert service.collect("client-0001", corrupt) is None
    assert fed.phase.rejections == {"malformed": 1}
