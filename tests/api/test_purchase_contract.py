"""The purchase contract's pieces that both the route and the raw-ASGI dispatch build on."""

from uuid import UUID, uuid4

from api.purchase_contract import status_url


def test_the_status_url_names_the_purchase_by_its_canonical_text_under_the_root_path() -> None:
    for purchase_id in (UUID(int=0), UUID(int=(1 << 128) - 1), uuid4(), uuid4()):
        assert status_url({}, purchase_id) == f"/purchases/{purchase_id}"
        assert status_url({"root_path": "/tickets"}, purchase_id) == (
            f"/tickets/purchases/{purchase_id}"
        )
