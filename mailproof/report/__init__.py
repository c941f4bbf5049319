"""What QA and the nightly job look at: Allure steps and email previews, the single-file Allure
report, and the rehearsal report.

Allure parts need the ``report`` extra (allure-pytest); the rehearsal report needs jinja2 and
matplotlib, in the same extra. Nothing is imported here eagerly: the pytest plugin imports the
Allure hooks only when allure-pytest is installed.
"""
