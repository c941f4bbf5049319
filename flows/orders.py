"""Order receipts: the lines and total in the body, and a CSV copy attached."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from flows import slo
from mailproof import flow

DEFAULT_LINES = (
    {"sku": "MUG-01", "name": "Mailproof mug", "qty": 2, "unit_price": "12.50"},
    {"sku": "TEE-M", "name": "Launch-day T-shirt (M)", "qty": 1, "unit_price": "20.00"},
)


@flow(feature="Orders", story="Order receipt", severity="critical")
def order_receipt(flow, lines=DEFAULT_LINES) -> None:
    """An order is placed; the receipt lists every line and the total, with a CSV attachment."""
    address = flow.mailbox.address("order")
    expected_total = sum(Decimal(l["unit_price"]) * l["qty"] for l in lines)
    with flow.step("Place an order"):
        response = flow.http.post("/orders", json={"email": address, "lines": list(lines)})
        assert response.status_code == 201, response.text
        order = response.json()
        assert Decimal(order["total"]) == expected_total
    with flow.step("Receive the receipt"):
        msg = flow.mailbox.wait_for(to=address, subject=order["order_id"], within=slo.TRANSACTIONAL)
        for line in lines:
            assert line["name"] in msg.text, f"{line['name']!r} missing from the receipt"
            assert line["name"] in msg.html_as_text
        assert str(expected_total) in msg.text and str(expected_total) in msg.html_as_text
    with flow.step("The CSV attachment matches the order"):
        attachment = msg.attachment(f"receipt-{order['order_id']}.csv")
        assert attachment.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(attachment.text())))
        assert [row["sku"] for row in rows] == [l["sku"] for l in lines]
        assert [int(row["qty"]) for row in rows] == [l["qty"] for l in lines]
