from . import orders


def test_order_receipt_has_invoice(run_flow):
    run_flow(orders.order_receipt_has_invoice)


def test_receipt_is_sent_after_the_response(run_flow, sink_faults):
    run_flow(orders.receipt_is_sent_after_the_response, faults=sink_faults)


def test_each_order_gets_its_own_receipt(run_flow):
    run_flow(orders.each_order_gets_its_own_receipt)
