"""The order of the initiate refusals that come from reads (SPEC §2): the opt-out list is a validation rule, so an
opted-out recipient is refused before any tenant rule, and a failed opt-out read outranks a failed company read,
however the two reads are scheduled."""

from __future__ import annotations

import pytest

from service.domain.company import CompanyRecord
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode, InvalidStoredRecord
from tests.fakes import RECIPIENTS
from tests.unit.test_initiation import COMPANY_ID, PROJECT_ID, Rig, company, make_rig


@pytest.fixture
def rig() -> Rig:
    return make_rig()


async def opt_out_the_recipient(rig: Rig) -> None:
    await rig.world.opt_outs.opt_out(COMPANY_ID, PROJECT_ID, "whatsapp", RECIPIENTS["whatsapp"], "2026-01-01")


@pytest.mark.parametrize(
    "tenant",
    [None, company(project_status="paused"), company(allowed_channels=["sms"])],
    ids=["unknown-company", "inactive", "channel-not-allowed"],
)
async def test_an_opted_out_recipient_is_refused_before_any_tenant_rule(rig: Rig, tenant: CompanyRecord | None) -> None:
    await opt_out_the_recipient(rig)
    if tenant is None:
        rig.world.companies.records.clear()
    else:
        rig.world.companies.records[(COMPANY_ID, PROJECT_ID)] = tenant

    with pytest.raises(ApiError) as refused:
        await rig.initiate()

    assert refused.value.code is ErrorCode.RECIPIENT_OPTED_OUT


async def test_a_failed_opt_out_read_outranks_a_failed_company_read(rig: Rig) -> None:
    rig.world.companies.faults.fail_next("get")
    rig.world.opt_outs.faults.fail_next("is_opted_out")

    with pytest.raises(DependencyUnavailable) as failed:
        await rig.initiate()

    assert failed.value.operation == "is_opted_out"


async def test_a_failed_company_read_is_reported_when_the_opt_out_read_succeeds(rig: Rig) -> None:
    await opt_out_the_recipient(rig)
    rig.world.companies.faults.fail_next("get", error=InvalidStoredRecord("company-data: 1 invalid field"))

    with pytest.raises(InvalidStoredRecord):
        await rig.initiate()

    assert rig.world.opt_outs.faults.calls["is_opted_out"] == 1
    assert rig.ledger.faults.calls["claim"] == 0
