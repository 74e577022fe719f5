"""schemathesis against the service's own OpenAPI schema (served by the real server), a bounded number of
examples per operation: no 5xx, documented status codes and content types, responses that match their
schemas, and schema-invalid requests refused."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.generation import GenerationMode
from svc_helpers import API_KEY


def no_server_error(ctx, response, case):
    """No 5xx, except the documented 504 of a request whose own `timeout_ms` passed before its inference (the
    schema allows any positive timeout, e.g. 5e-324 ms, which no server can meet)."""
    if response.status_code == 504 and "timeout_ms" in (case.query or {}) and "deadline" in response.text:
        return None
    return checks.not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
EXAMPLES = 12  # per operation and mode: the whole file stays well under a minute


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(f"{server.http}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {"POST /detect", "POST /detect/render",
                                                                 "GET /healthz", "GET /readyz", "GET /v1/model"}
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_honours_its_own_schema(operations, mode):
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.path not in ("/detect", "/detect/render"):
            continue  # the GET endpoints take no input, so there is nothing to make invalid
        @given(op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, checks=CHECKS)
        check()
