"""The bounds on hypha-rpc's public message cache (colabel.apps.message_cache_limits): what another client can make
a colabel process hold. Real Hypha server subprocesses, real hypha-rpc clients."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from hypha_rpc import connect_to_server

from colabel.apps.hypha_server import free_port
from colabel.apps.message_cache_limits import bound_message_cache, installed_cache
from conftest import collection, make_image_folder, square, start_colabel

pytestmark = [pytest.mark.integration]

CHUNK = b"x" * 1000
CLASSES = [{"name": "nucleus", "color": "#ff0000"}]


def assert_one_line_refusal(exc: BaseException, message: str) -> None:
    """What a refused caller is told: the sentence, under the neutral frame name, no path and no other frame."""
    text = str(exc)
    assert message in text, text
    assert 'File "/' not in text and "site-packages" not in text and "message_cache_limits.py" not in text, text
    assert "<colabel provider>" in text, text


async def echo(data):
    return data


async def test_a_message_past_its_bound_is_refused_and_dropped_and_all_messages_share_a_bound(hypha_server):
    receiver = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx")})
    stranger = await connect_to_server({"server_url": hypha_server.url})
    try:
        cache = bound_message_cache(receiver, max_message_bytes=3500, max_total_bytes=6000, max_age_s=3600)
        store = receiver.rpc._object_store
        builtin = await stranger.get_service(f"{receiver.config.workspace}/{receiver.config.client_id}:built-in")
        await builtin.message_cache.create("a")
        for _ in range(3):
            await builtin.message_cache.append("a", CHUNK)
        with pytest.raises(Exception, match="a message of more than 3500 bytes is refused"):
            await builtin.message_cache.append("a", CHUNK)
        assert "a" not in store["message_cache"] and cache.total_bytes == 0  # dropped whole, nothing held
        with pytest.raises(Exception, match="does not exists"):
            await builtin.message_cache.append("a", CHUNK)

        for key in ("b", "c"):
            await builtin.message_cache.create(key)
            for _ in range(3):
                await builtin.message_cache.set(key, _, CHUNK)
        assert cache.total_bytes == 6000
        await builtin.message_cache.create("d")
        with pytest.raises(Exception, match="too many large messages at once"):
            await builtin.message_cache.append("d", CHUNK)
        assert "d" not in store["message_cache"]
        await builtin.message_cache.remove("b")  # the caller gives one up: room again
        await builtin.message_cache.create("e")
        await builtin.message_cache.append("e", CHUNK)
        assert cache.total_bytes == 4000 and sorted(cache.sizes) == ["c", "e"]
    finally:
        await stranger.disconnect()
        await receiver.disconnect()


async def test_a_message_never_completed_is_dropped_once_older_than_its_bound_and_own_workspace_calls_pass(
        hypha_server):
    receiver = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx2")})
    stranger = await connect_to_server({"server_url": hypha_server.url})
    try:
        now = [0.0]
        cache = bound_message_cache(receiver, max_message_bytes=2500, max_total_bytes=10_000, max_age_s=60)
        cache.clock = lambda: now[0]
        builtin = await stranger.get_service(f"{receiver.config.workspace}/{receiver.config.client_id}:built-in")
        await builtin.message_cache.create("left")
        await builtin.message_cache.append("left", CHUNK)
        now[0] = 61.0
        await builtin.message_cache.create("next")  # starting a message drops the abandoned one
        assert "left" not in receiver.rpc._object_store["message_cache"] and list(cache.sizes) == ["next"]

        # the receiver's own workspace (its model services' answers) is not bounded: a 5 kB echo comes back
        async def echo(data):
            return data

        await receiver.register_service({"id": "echo", "config": {"visibility": "protected"}, "echo": echo})
        own = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx2")})
        try:
            service = await own.get_service(f"{receiver.config.workspace}/{receiver.config.client_id}:echo")
            big = b"y" * 300_000  # sent in chunks (hypha-rpc's chunk size is 256 kB)
            assert await service.echo(big) == big
        finally:
            await own.disconnect()
    finally:
        await stranger.disconnect()
        await receiver.disconnect()


async def test_one_client_holds_its_own_budget_only_and_another_callers_chunked_call_goes_through(hypha_server):
    """One anonymous client filled the bound shared by all callers (256 MiB) and every large call of every other
    caller was refused for 5 minutes. Now each client has a budget of its own, well below the shared one."""
    receiver = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx3")})
    squatter = await connect_to_server({"server_url": hypha_server.url})
    honest = await connect_to_server({"server_url": hypha_server.url})
    try:
        cache = bound_message_cache(receiver, max_message_bytes=400_000, max_caller_bytes=500_000,
                                    max_total_bytes=800_000, max_caller_messages=3)
        assert installed_cache(receiver) is cache
        await receiver.register_service({"id": "echo", "config": {"visibility": "public"}, "echo": echo})
        target = f"{receiver.config.workspace}/{receiver.config.client_id}"
        builtin = await squatter.get_service(f"{target}:built-in")
        chunk = b"s" * 100_000
        with pytest.raises(Exception) as refused:
            for m in range(3):
                await builtin.message_cache.create(f"squat-{m}")
                for _ in range(3):
                    await builtin.message_cache.append(f"squat-{m}", chunk)
        assert_one_line_refusal(refused.value, "PayloadTooLargeError: more than 500000 bytes of large messages at "
                                               "once from one client are refused")
        held = cache.caller_bytes[f"{squatter.config.workspace}/{squatter.config.client_id}"]
        assert held == 300_000 and cache.total_bytes == held  # the refused message was dropped whole
        for key in ("squat-b", "squat-c"):
            await builtin.message_cache.create(key)
        with pytest.raises(Exception) as refused:  # no more messages than its bound either, even empty ones
            await builtin.message_cache.create("squat-d")
        assert_one_line_refusal(refused.value, "more than 3 large messages at once from one client are refused")

        # another caller's large call (sent in chunks: hypha-rpc's chunk size is 256 kB) goes through meanwhile
        service = await honest.get_service(f"{target}:echo")
        big = b"h" * 350_000
        assert await service.echo(big) == big
        # and nobody reaches another caller's message
        other = await honest.get_service(f"{target}:built-in")
        await other.message_cache.create("mine")
        for call in (builtin.message_cache.append("mine", chunk), builtin.message_cache.remove("mine"),
                     builtin.message_cache.create("mine", False, True)):
            with pytest.raises(Exception) as refused:
                await call
            assert_one_line_refusal(refused.value, "'mine'")
        assert cache.entries["mine"].caller == f"{honest.config.workspace}/{honest.config.client_id}"
        with pytest.raises(Exception) as refused:  # an unknown key: one line, no KeyError traceback
            await builtin.message_cache.remove("no-such-key")
        assert_one_line_refusal(refused.value, "MessageCacheError: Message with key no-such-key does not exists.")
    finally:
        await honest.disconnect()
        await squatter.disconnect()
        await receiver.disconnect()


async def test_a_message_without_a_chunk_for_its_idle_bound_is_dropped_when_any_chunk_arrives(hypha_server):
    receiver = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx4")})
    squatter = await connect_to_server({"server_url": hypha_server.url})
    honest = await connect_to_server({"server_url": hypha_server.url})
    try:
        now = [0.0]
        cache = bound_message_cache(receiver, max_message_bytes=10_000, max_total_bytes=10_000, idle_s=30)
        cache.clock = lambda: now[0]
        target = f"{receiver.config.workspace}/{receiver.config.client_id}:built-in"
        squat, mine = await squatter.get_service(target), await honest.get_service(target)
        await squat.message_cache.create("idle")
        for _ in range(8):
            await squat.message_cache.append("idle", CHUNK)
        now[0] = 20.0
        await mine.message_cache.create("h")
        await mine.message_cache.append("h", CHUNK)
        with pytest.raises(Exception, match="too many large messages at once"):  # the squatter holds the room
            for _ in range(2):
                await mine.message_cache.append("h", CHUNK)
        await mine.message_cache.create("h")
        now[0] = 31.0  # the squatter's message went 31 s without a chunk; an append (no create) drops it
        await mine.message_cache.append("h", CHUNK)
        assert "idle" not in receiver.rpc._object_store["message_cache"] and cache.sizes == {"h": 1000}
        for _ in range(8):
            await mine.message_cache.append("h", CHUNK)
        now[0] = 55.0  # fed 24 s ago: kept
        await mine.message_cache.create("h2")
        assert sorted(cache.sizes) == ["h", "h2"]
    finally:
        await honest.disconnect()
        await squatter.disconnect()
        await receiver.disconnect()


async def test_the_messages_of_a_client_hypha_reports_gone_are_dropped(hypha_server):
    """Hypha reports the disconnection of the clients of the receiver's own workspace (those of other workspaces
    go by the idle bound)."""
    receiver = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx5")})
    other = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("rx5")})
    try:
        cache = bound_message_cache(receiver, max_message_bytes=10_000)
        builtin = await other.get_service(f"{receiver.config.workspace}/{receiver.config.client_id}:built-in")
        await builtin.message_cache.create("left")
        await builtin.message_cache.append("left", CHUNK)
        assert "left" in receiver.rpc._object_store["message_cache"]
        await other.disconnect()
        for _ in range(200):
            if "left" not in receiver.rpc._object_store["message_cache"]:
                break
            await asyncio.sleep(0.05)
        assert "left" not in receiver.rpc._object_store["message_cache"] and "left" not in cache.entries
    finally:
        await receiver.disconnect()


async def test_an_annotators_large_save_goes_through_while_anonymous_clients_fill_their_pool(hypha_server, tmp_path):
    """Clients that made a call with a live session token count in a pool of their own: anonymous clients, however
    many, filling theirs do not refuse an annotator's large save."""
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.provider.rpc import ProviderServices

    server = await connect_to_server({"server_url": hypha_server.url, "token": hypha_server.user_token("mcprov")})
    clients = [await connect_to_server({"server_url": hypha_server.url}) for _ in range(4)]
    annotator, late, *squatters = clients
    try:
        cache = bound_message_cache(server, max_message_bytes=1 << 20, max_caller_bytes=1 << 20,
                                    max_total_bytes=2 << 20)
        provider = DataProvider(make_image_folder(tmp_path / "images"))
        name = f"m{secrets.token_hex(4)}"
        services = ProviderServices(provider, server, name=name, public_url=hypha_server.url)
        await services.register()
        assert cache.is_member == services.caller_has_live_token
        session, token = provider.create_session(name="s", classes=CLASSES)
        builtin_id = f"{server.config.workspace}/{server.config.client_id}:built-in"
        chunk = b"q" * (256 << 10)
        for n, squatter in enumerate(squatters):  # two anonymous clients fill the pool of callers without a token
            builtin = await squatter.get_service(builtin_id)
            for m in range(2):
                await builtin.message_cache.create(f"squat-{n}-{m}")
                for _ in range(2):
                    await builtin.message_cache.append(f"squat-{n}-{m}", chunk)
        assert cache.pool_bytes == {"anonymous": 2 << 20, "member": 0}
        builtin = await late.get_service(builtin_id)
        await builtin.message_cache.create("late")
        with pytest.raises(Exception, match="too many large messages at once"):
            await builtin.message_cache.append("late", chunk)

        annotate = await annotator.get_service(f"{server.config.workspace}/{name}-annotate")
        joined = await annotate.join(token, "Honest")
        caller = f"{annotator.config.workspace}/{annotator.config.client_id}"
        assert services.caller_has_live_token(caller) and not services.caller_has_live_token(
            f"{late.config.workspace}/{late.config.client_id}")
        image = next(i for i in await annotate.list_images(token) if i["name"] == "ihc_ki67.png")
        payload = json.dumps(collection(*[square(1 + (i % 50) * 10, 1 + (i // 50) * 10, 8) for i in range(2500)]))
        assert len(payload) > 300_000  # sent in chunks
        record = await annotate.save_annotation(token, joined["annotator_key"], image["image_id"], payload)
        assert record["version"] == 1 and record["n_features"] == 2500
        assert cache.pool_bytes["member"] == 0  # processed: held no longer

        provider.sessions.revoke_token(session.session_id, provider.sessions.token_id(token))
        assert not services.caller_has_live_token(caller)  # a revoked token no longer counts
    finally:
        for client in clients:
            await client.disconnect()
        await server.disconnect()


async def test_colabel_serve_refuses_an_anonymous_oversized_message_and_holds_nothing_of_it(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    port = free_port()
    process, printed = await asyncio.to_thread(
        start_colabel, ["serve", str(folder), "--port", str(port), "--models", ""])
    try:
        assert "provider_service" in printed, printed
        stranger = await connect_to_server({"server_url": f"http://127.0.0.1:{port}"})
        try:
            workspace = printed["provider_service"].split("/")[0]
            builtin = await stranger.get_service(f"{workspace}/colabel-colabel-provider:built-in")  # its client
            await builtin.message_cache.create("x")
            chunk = b"z" * (512 << 10)
            with pytest.raises(Exception, match=r"a message of more than \d+ bytes is refused") as refused:
                for _ in range(80):  # 40 MB: past a save's bound (2 x 16 MiB + 1 MiB)
                    await builtin.message_cache.append("x", chunk)
            assert_one_line_refusal(refused.value, "PayloadTooLargeError: a message of more than")
            with pytest.raises(Exception, match="does not exists"):
                await builtin.message_cache.append("x", chunk)
        finally:
            await stranger.disconnect()
    finally:
        process.terminate()
        process.wait(timeout=30)
