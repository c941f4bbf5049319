from flows import orders


def test_order_receipt(run_flow):
    run_flow(orders.order_receipt)
