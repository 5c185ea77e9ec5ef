"""Schemathesis over our OpenAPI schema against a live server: no input makes a 5xx.

Bounded (about 15 s on CPU): six examples per operation, short limits on text and audio length, so every generated
request is cheap on the demo engine.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from .conftest import serve  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(engine, tmp_path_factory):
    with serve(engine, tmp_path_factory.mktemp("fuzz"), max_text_chars=80, max_output_ms=320,
               max_reference_seconds=1.0, max_upload_bytes=64 * 1024, session_max=8) as live:
        yield live


def test_no_input_makes_a_server_error(fuzz_server):
    # Driven by hand (not schemathesis.pytest): one hypothesis run per operation, found at run time.
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                  suppress_health_check=list(HealthCheck))
        def no_5xx(case) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

        no_5xx()
