"""Flask Shop order emails: the receipt, with its PDF invoice and CSV, sent after the response."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from mailproof import flow
from mailproof.faults import Delay

from . import shop

CART = [
    {"sku": "MUG-01", "name": "Flask mug", "quantity": 2, "unit_price": "12.50"},
    {"sku": "TEE-42", "name": "Werkzeug T-shirt", "quantity": 1, "unit_price": "19.99"},
    {"sku": "STK-07", "name": "Jinja sticker, set of 3", "quantity": 3, "unit_price": "1.10"},
]


def expected_lines(cart: list[dict]) -> tuple[list[dict], str]:
    """The receipt's CSV rows and total, computed here rather than trusted from the app."""
    rows, total = [], Decimal("0.00")
    for item in cart:
        line_total = (Decimal(item["unit_price"]) * item["quantity"]).quantize(Decimal("0.01"))
        total += line_total
        rows.append({"sku": item["sku"], "name": item["name"], "quantity": str(item["quantity"]),
                     "unit_price": item["unit_price"], "line_total": str(line_total)})
    rows.append({"sku": "", "name": "Total (EUR)", "quantity": "", "unit_price": "", "line_total": str(total)})
    return rows, str(total)


def place_order(flow, address: str, cart: list[dict], name: str = "Grace Hopper"):
    response = flow.http.post("/orders", json={"email": address, "name": name, "items": cart})
    assert response.status_code == 202, f"order refused: {response.status_code} {response.text}"
    return response


@flow(feature="Flask Shop orders", story="Order receipt with invoice", severity="critical")
def order_receipt_has_invoice(flow, cart: list[dict] = CART) -> None:
    """An order's receipt arrives with the right total, a PDF invoice and a CSV of exactly the lines ordered."""
    address = flow.mailbox.address("order")
    rows, total = expected_lines(cart)
    with flow.step("Place an order"):
        order = place_order(flow, address, cart).json()
        order_id = order["order_id"]
        assert order["total"] == total, f"the app totals {order['total']}, the cart {total}"
    with flow.step("Receive the receipt"):
        msg = flow.mailbox.wait_for(to=address, subject=f"receipt for order {order_id}", within=shop.RECEIPT)
        assert shop.SENDER in msg.from_, msg.from_
        assert f"Total: EUR {total}" in msg.text, msg.text
        assert f"EUR {total}" in msg.html_as_text, msg.html_as_text
        assert sorted(a.filename for a in msg.attachments) == [f"order-{order_id}.csv", f"receipt-{order_id}.pdf"]
    with flow.step("The CSV holds exactly the lines ordered"):
        sheet = msg.attachment(f"order-{order_id}.csv")
        assert sheet.content_type == "text/csv", sheet.content_type
        assert list(csv.DictReader(io.StringIO(sheet.text()))) == rows
    with flow.step("The PDF invoice is a PDF with the order and its total"):
        invoice = msg.attachment(f"receipt-{order_id}.pdf")
        assert invoice.content_type == "application/pdf", invoice.content_type
        assert invoice.data.startswith(b"%PDF-1.") and invoice.data.rstrip().endswith(b"%%EOF"), invoice.data[:40]
        assert f"receipt for order {order_id}".encode() in invoice.data
        assert f"(Total: EUR {total})".encode() in invoice.data, "the invoice should state the total"
    with flow.step("The link shows the same order"):
        page = flow.http.get(msg.link(text="View your order"))
        assert page.status_code == 200 and page.json()["total"] == total, page.text


@flow(feature="Flask Shop orders", story="The receipt is sent after the response", severity="critical")
def receipt_is_sent_after_the_response(flow, faults, relay_delay: float = 0.6) -> None:
    """With a slow relay, the order is still answered at once: the receipt goes out in the
    background, and its latency from the order (not the request's duration) includes the delay.

    ``faults`` is the ``sink_faults`` fixture: the sink takes ``relay_delay`` seconds to accept
    this address at RCPT, before the message is sent (a delay at ``data`` would come after the
    sink timestamps the message, and not show in its latency).
    """
    address = flow.mailbox.address("slowrelay")
    rule = faults.rule("rcpt", Delay(relay_delay), to=address)
    with flow.step("Place an order"):
        response = place_order(flow, address, CART[:1])
        answered = response.elapsed.total_seconds()
        assert answered < relay_delay, (
            f"the order took {answered:.3f} s to answer, past the relay's {relay_delay} s delay: "
            "the request waited for the mail")
    with flow.step("The receipt arrives within its SLO, measured from the order"):
        msg = flow.mailbox.wait_for(to=address, subject=f"receipt for order {response.json()['order_id']}",
                                    within=shop.RECEIPT)
        assert rule.fired == 1, rule.describe()
        assert msg.latency >= relay_delay > answered, (
            f"latency {msg.latency:.3f} s should include the relay's {relay_delay} s, "
            f"the request took {answered:.3f} s")


@flow(feature="Flask Shop orders", story="Back-to-back orders each get their own receipt", severity="normal")
def each_order_gets_its_own_receipt(flow, orders: int = 3) -> None:
    """Several orders from one customer, placed back to back: one receipt each, none mixed up."""
    address = flow.mailbox.address("repeat")
    placed = {}
    with flow.step(f"Place {orders} orders"):
        for quantity in range(1, orders + 1):
            cart = [{**CART[0], "quantity": quantity}]
            placed[place_order(flow, address, cart).json()["order_id"]] = expected_lines(cart)
    with flow.step(f"Receive {orders} receipts"):
        receipts = flow.mailbox.wait_for(to=address, subject="receipt for order", count=orders, within=shop.RECEIPT)
    with flow.step("Each receipt carries its own order's lines"):
        seen = {}
        for msg in receipts:
            order_id = msg.subject.rsplit(" ", 1)[1]
            rows = list(csv.DictReader(io.StringIO(msg.attachment(f"order-{order_id}.csv").text())))
            seen[order_id] = (rows, rows[-1]["line_total"])
        assert seen == placed, f"receipts {sorted(seen)} for orders {sorted(placed)}"
    with flow.step("No receipt twice"):
        shop.outbox_idle(flow)
        flow.mailbox.expect_no_mail(to=address, within=shop.NO_MAIL_WINDOW)
