"""The hub and the agent in one trio run over real TLS on loopback: hello, dial, refusals,
reconnection with backoff, audit events, HA pick."""

from __future__ import annotations

import pytest
import trio

from dbproxy.agent.client import EXIT_REFUSED, Agent, AgentOptions, AllowList
from dbproxy.agent.config import AgentsConfig
from dbproxy.agent.hub import AgentHub
from dbproxy.agent.tokens import NodeTokens
from dbproxy.configtypes import ListenerTLS
from dbproxy.errors import UpstreamError
from dbproxy.identity.authority import TokenAuthority
from dbproxy.identity.config import TokenConfig
from dbproxy.identity.keys import generate_keys
from scripts.peers.certs import make_ca, make_cert


@pytest.fixture
def env(tmp_path):
    generate_keys("HS256", str(tmp_path / "token.key"), None)
    authority = TokenAuthority(TokenConfig(algorithm="HS256", key_file=str(tmp_path / "token.key"),
                                           public_key_file=None, registry_file=None, revocation_file=None, leeway=0))
    ca = make_ca(tmp_path / "tls")
    cert, key = make_cert(tmp_path / "tls", ca, "proxy", sans=["127.0.0.1"])
    events: list[tuple[str, dict]] = []
    hub = AgentHub(AgentsConfig("127.0.0.1", 0, ListenerTLS(str(cert), str(key)), heartbeat=0.2, heartbeat_timeout=1.0),
                   NodeTokens(authority), emit=lambda kind, **fields: events.append((kind, fields)))
    return hub, NodeTokens(authority), str(ca[0]), events


def options(hub, token: str, ca: str, allow: list[str], node: str = "n1") -> AgentOptions:
    host, port = hub.address
    return AgentOptions(proxy_host=host, proxy_port=port, node=node, token=lambda: token, allow=AllowList.parse(allow),
                        ca_file=ca, version="test", heartbeat=0.2, heartbeat_timeout=1.0, backoff_initial=0.05,
                        backoff_max=0.2)


async def echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    listeners = await nursery.start(trio.serve_tcp, echo, 0, )
    return listeners[0].socket.getsockname()[1]


async def wait_for(predicate, timeout: float = 10.0):
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.02)
    return value


async def test_dial_through_an_agent_and_refusals(env):
    hub, tokens, ca, events = env
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        port = await echo_server(nursery)
        token, _ = tokens.issue("n1", 600)
        agent = Agent(options(hub, token, ca, [f"127.0.0.1:{port}"]))
        nursery.start_soon(agent.run)
        await wait_for(lambda: hub.pick("n1"))
        stream = await hub.dial("n1", "127.0.0.1", port)
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        assert hub.connections()["connections"][0]["target"] == f"127.0.0.1:{port}"
        await stream.aclose()
        # Not on the allow-list: the agent says 403, the proxy an UpstreamError with its reason.
        with pytest.raises(UpstreamError) as info:
            await hub.dial("n1", "127.0.0.1", port + 1 if port < 65535 else 1)
        assert "is not on the allow-list of this agent" in info.value.client_hint
        with pytest.raises(UpstreamError) as info:
            await hub.dial("other", "127.0.0.1", port)
        assert "no agent of node 'other' is connected" in info.value.client_hint
        kinds = [k for k, _ in events]
        assert kinds[0] == "agent.connect" and "agent.stream.open" in kinds and "agent.stream.close" in kinds
        close = [f for k, f in events if k == "agent.stream.close"][0]
        assert close["bytes_to_target"] == 4 and close["bytes_from_target"] == 4 and close["node"] == "n1"
        assert all(token not in repr(f) for _, f in events)
        nursery.cancel_scope.cancel()


async def test_agent_reconnects_after_the_link_drops(env):
    hub, tokens, ca, events = env
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        token, _ = tokens.issue("n1", 600)
        agent = Agent(options(hub, token, ca, ["127.0.0.1:1"]))
        nursery.start_soon(agent.run)
        first = await wait_for(lambda: hub.pick("n1"))
        await first.link.aclose("test: the proxy drops the link")
        second = await wait_for(lambda: (a := hub.pick("n1")) is not None and a is not first and a)
        assert second.id != first.id and agent.links == 2
        assert [k for k, _ in events].count("agent.disconnect") == 1
        nursery.cancel_scope.cancel()


async def test_refused_token_ends_the_agent(env):
    hub, tokens, ca, events = env
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        token, _ = tokens.issue("n2", 600)  # a token for another node
        with trio.fail_after(10):
            assert await Agent(options(hub, token, ca, ["127.0.0.1:1"])).run() == EXIT_REFUSED
        expired, _ = tokens.issue("n1", 1, now=1_000_000_000)
        with trio.fail_after(10):
            assert await Agent(options(hub, expired, ca, ["127.0.0.1:1"])).run() == EXIT_REFUSED
        assert [f["reason"] for k, f in events if k == "agent.refused"] == ["token_wrong_node", "token_expired"]
        assert not hub.nodes
        nursery.cancel_scope.cancel()


async def test_several_agents_serve_one_node(env):
    hub, tokens, ca, _ = env
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        port = await echo_server(nursery)
        token, _ = tokens.issue("n1", 600)
        for _ in range(2):
            nursery.start_soon(Agent(options(hub, token, ca, [f"127.0.0.1:{port}"])).run)
        await wait_for(lambda: len(hub.nodes.get("n1", ())) == 2)
        streams = [await hub.dial("n1", "127.0.0.1", port) for _ in range(4)]
        # The least busy agent each time: two streams on each.
        assert sorted(len(a.link.streams) for a in hub.nodes["n1"]) == [2, 2]
        for s in streams:
            await s.aclose()
        nursery.cancel_scope.cancel()
