"""The tenant's SQS message group (service/domain/company.py `tenant_group`): what fair queues share out by."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from service.domain.company import tenant_group

VALID_GROUP = re.compile(r"[!-~]{1,128}", re.ASCII)
ids = st.text(min_size=1, max_size=200)


def test_a_plain_tenant_s_group_reads_company_hash_project() -> None:
    assert tenant_group("ci-demo-001", "pi-demo-001") == "ci-demo-001#pi-demo-001"


@given(ids, ids)
def test_every_tenant_gets_a_group_sqs_accepts(company_id: str, project_id: str) -> None:
    assert VALID_GROUP.fullmatch(tenant_group(company_id, project_id))


@given(ids, ids)
def test_a_tenant_s_group_is_the_same_every_time(company_id: str, project_id: str) -> None:
    assert tenant_group(company_id, project_id) == tenant_group(company_id, project_id)


def test_tenants_that_only_differ_where_the_separator_falls_get_different_groups() -> None:
    assert tenant_group("a#b", "c") != tenant_group("a", "b#c")


def test_ids_sqs_would_refuse_still_give_distinct_groups() -> None:
    assert tenant_group("société", "p1") != tenant_group("société", "p2")
    assert tenant_group("x" * 200, "p1") != tenant_group("x" * 200, "p2")
