// Allure 3 configuration for mailproof's QA report: `make report` (python -m mailproof.report.allure_build).
//
// One self-contained index.html (opens from disk), history kept across runs for the trends, and
// failure categories QA can filter by. Categories match the label `failure` that mailproof's pytest
// plugin (mailproof/report/allure_hooks.py) puts on every failed flow test; results written without it
// fall back to the exception class at the start of the message ("mailproof.errors.MailLate: ...").
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));

// The history file (one JSON line per report built) is git-ignored; tests point it elsewhere.
const historyPath = process.env.MAILPROOF_ALLURE_HISTORY || here("./.allure-history/history.jsonl");  // the builder always sets it

const FAILED = ["failed", "broken"];
const failedFlow = (d) =>
  FAILED.includes(d.status) && d.labels.some((l) => l.name === "tag" && l.value === "flow");
const byLabel = (value) => ({ statuses: FAILED, labels: { failure: `^${value}$` } });
const byMessage = (re) => (d) => failedFlow(d) && re.test(d.message ?? "");

export default {
  name: "mailproof: email flows",
  historyPath,
  historyLimit: 50,
  // Every flow test has a feature (mailproof's plugin sets it); the harness's own tests (tests/,
  // run by `make test` into the same results) do not: they group under one feature of their own
  // instead of burying the flows at the root of the tree.
  defaultLabels: { feature: "Harness self-tests (not flows)" },
  // Noise for QA on every test page; the flow's feature, story, severity and tag stay.
  hideLabels: ["host", "thread", "framework", "language", "package"],
  plugins: {
    awesome: {
      options: {
        reportName: "mailproof: email flows",
        singleFile: true,
        reportLanguage: "en",
        theme: "light",
        groupBy: ["feature", "story"],
        stepTreeExpansion: "expand_failed_only",
      },
    },
  },
  categories: [
    {
      name: "Mail never arrived",
      matchers: [byLabel("Mail never arrived"), byMessage(/^mailproof\.errors\.MailNotDelivered\b/)],
      groupByMessage: false,
      groupBy: [{ label: "feature" }],
    },
    {
      name: "Mail late",
      matchers: [byLabel("Mail late"), byMessage(/^mailproof\.errors\.MailLate\b/)],
      groupByMessage: false,
      groupBy: [{ label: "feature" }],
    },
    {
      name: "Unexpected mail",
      matchers: [byLabel("Unexpected mail"), byMessage(/^mailproof\.errors\.UnexpectedMail\b/)],
      groupByMessage: false,
      groupBy: [{ label: "feature" }],
    },
    {
      name: "Application error (HTTP 5xx, unreachable)",
      matchers: [
        byLabel("Application error"),
        byMessage(/^(requests\.exceptions\.(ConnectionError|Timeout|ReadTimeout|ConnectTimeout)|mailproof\.http\.(AppUnreachable|AppTimeout)|ConnectionRefusedError)\b/),
      ],
      groupByMessage: false,
      groupBy: [{ label: "feature" }],
    },
    {
      name: "Harness error",
      matchers: [byLabel("Harness error"), byMessage(/^mailproof\.errors\.MailproofError\b/)],
      groupByMessage: true,
    },
    {
      name: "Content mismatch",
      matchers: [byLabel("Content mismatch"), byMessage(/^AssertionError\b/)],
      groupByMessage: false,
      groupBy: [{ label: "feature" }],
    },
    {
      // A failed flow test this config cannot place, and the harness's own tests (tests/).
      name: "Other failures",
      matchers: (d) => FAILED.includes(d.status),
      groupByMessage: true,
    },
  ],
};
