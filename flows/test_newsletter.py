from flows import newsletter


def test_newsletter_one_click_unsubscribe(run_flow):
    run_flow(newsletter.newsletter_one_click_unsubscribe)
