"""The bounds on hypha-rpc's public message cache (colabel.apps.message_cache_limits): what another client can make
a colabel process hold. Real Hypha server subprocesses, real hypha-rpc clients."""

from __future__ import annotations

import asyncio

import pytest
from hypha_rpc import connect_to_server

from colabel.apps.hypha_server import free_port
from colabel.apps.message_cache_limits import bound_message_cache
from conftest import make_image_folder, start_colabel

pytestmark = [pytest.mark.integration]

CHUNK = b"x" * 1000


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
            with pytest.raises(Exception, match=r"a message of more than \d+ bytes is refused"):
                for _ in range(80):  # 40 MB: past a save's bound (2 x 16 MiB + 1 MiB)
                    await builtin.message_cache.append("x", chunk)
            with pytest.raises(Exception, match="does not exists"):
                await builtin.message_cache.append("x", chunk)
        finally:
            await stranger.disconnect()
    finally:
        process.terminate()
        process.wait(timeout=30)
