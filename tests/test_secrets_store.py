"""SecretsManagerStore against Secrets Manager on moto: parsing, the TTL cache, and how failures classify."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from service.adapters.aws.secrets_store import SecretsManagerStore, classify_aws_failure
from service.bootstrap import Dependencies
from service.domain.provider_ports import PermanentProviderError, TransientProviderError

TWILIO_SECRET = {"twilio_account_sid": "AC" + "1" * 32, "twilio_auth_token": "token-1", "twilio_template_sid": "HX1"}


async def new_secret(deps: Dependencies, value: str) -> str:
    name = f"test/secrets-store/{uuid.uuid4().hex}"
    await deps.aws.secrets.create_secret(Name=name, SecretString=value)
    return name


async def delete_secret(deps: Dependencies, name: str) -> None:
    await deps.aws.secrets.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)


@pytest.fixture
def store(deps: Dependencies) -> SecretsManagerStore:
    return SecretsManagerStore(deps.aws.secrets, ttl_s=30)


class CountingSecrets:
    """The real client, with a count of GetSecretValue calls (to see single-flight)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls = 0

    async def get_secret_value(self, **kwargs: Any) -> Any:
        self.calls += 1
        await asyncio.sleep(0.05)  # keep the first load in flight while the others arrive
        return await self._client.get_secret_value(**kwargs)


async def test_secret_is_returned_as_a_dict_of_strings(deps: Dependencies, store: SecretsManagerStore) -> None:
    name = await new_secret(deps, orjson.dumps(TWILIO_SECRET).decode())
    assert await store.get_json(name) == TWILIO_SECRET


async def test_secret_is_served_from_the_cache_within_the_ttl(deps: Dependencies, store: SecretsManagerStore) -> None:
    name = await new_secret(deps, orjson.dumps(TWILIO_SECRET).decode())
    await store.get_json(name)
    await delete_secret(deps, name)  # a second AWS call would now fail
    assert await store.get_json(name) == TWILIO_SECRET


async def test_secret_is_fetched_again_after_the_ttl(deps: Dependencies) -> None:
    store = SecretsManagerStore(deps.aws.secrets, ttl_s=0.3)
    name = await new_secret(deps, orjson.dumps(TWILIO_SECRET).decode())
    await store.get_json(name)
    rotated = {**TWILIO_SECRET, "twilio_auth_token": "token-2"}
    await deps.aws.secrets.put_secret_value(SecretId=name, SecretString=orjson.dumps(rotated).decode())
    await asyncio.sleep(0.35)
    assert await store.get_json(name) == rotated


async def test_changing_a_returned_secret_does_not_change_the_cache(
    deps: Dependencies, store: SecretsManagerStore
) -> None:
    name = await new_secret(deps, orjson.dumps(TWILIO_SECRET).decode())
    (await store.get_json(name))["twilio_auth_token"] = "tampered"
    assert await store.get_json(name) == TWILIO_SECRET


async def test_concurrent_misses_share_one_fetch(deps: Dependencies) -> None:
    name = await new_secret(deps, orjson.dumps(TWILIO_SECRET).decode())
    counting = CountingSecrets(deps.aws.secrets)
    store = SecretsManagerStore(counting, ttl_s=60)  # type: ignore[arg-type]
    results = await asyncio.gather(*(store.get_json(name) for _ in range(20)))
    assert counting.calls == 1 and all(result == TWILIO_SECRET for result in results)


async def test_missing_secret_is_permanent(store: SecretsManagerStore) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await store.get_json(f"test/secrets-store/missing-{uuid.uuid4().hex}")
    assert (caught.value.reason, caught.value.code) == ("secret_not_found", "ResourceNotFoundException")


async def test_secret_that_is_not_json_is_permanent(deps: Dependencies, store: SecretsManagerStore) -> None:
    name = await new_secret(deps, "twilio_auth_token=token-1")
    with pytest.raises(PermanentProviderError) as caught:
        await store.get_json(name)
    assert caught.value.reason == "secret_not_json"
    assert "token-1" not in str(caught.value)


async def test_secret_that_is_not_an_object_of_strings_is_permanent(
    deps: Dependencies, store: SecretsManagerStore
) -> None:
    name = await new_secret(deps, orjson.dumps({"twilio_auth_token": 12345}).decode())
    with pytest.raises(PermanentProviderError):
        await store.get_json(name)


async def test_failures_are_not_cached(deps: Dependencies, store: SecretsManagerStore) -> None:
    name = f"test/secrets-store/{uuid.uuid4().hex}"
    with pytest.raises(PermanentProviderError):
        await store.get_json(name)
    await deps.aws.secrets.create_secret(Name=name, SecretString=orjson.dumps(TWILIO_SECRET).decode())
    assert await store.get_json(name) == TWILIO_SECRET


@pytest.fixture
async def unreachable_secrets() -> AsyncIterator[Any]:
    config = AioConfig(connect_timeout=0.5, read_timeout=0.5, retries={"mode": "standard", "max_attempts": 1})
    async with get_session().create_client(
        "secretsmanager", region_name="eu-west-2", endpoint_url="http://127.0.0.1:9", config=config
    ) as client:
        yield client


async def test_unreachable_secrets_manager_is_transient(unreachable_secrets: Any) -> None:
    with pytest.raises(TransientProviderError) as caught:
        await SecretsManagerStore(unreachable_secrets, ttl_s=60).get_json("any")
    assert caught.value.reason == "secrets_unavailable"


@pytest.mark.parametrize("code", ["ThrottlingException", "InternalServiceError"])
def test_throttling_and_service_errors_are_transient(code: str) -> None:
    failure = classify_aws_failure(ClientError({"Error": {"Code": code}}, "GetSecretValue"))
    assert isinstance(failure, TransientProviderError) and failure.code == code
