"""Deterministic synthetic prose: contracts, specifications, tool schemas, replies.

The text only has to look like what users send (clauses, numbered sections, figures, JSON) and be
sized in tokens without a tokenizer, so the benchmark needs no model files. ``estimate_tokens``
was calibrated against the Gemma 3 tokenizer on this generator's output (within a few percent).
"""

from __future__ import annotations

import random
import re

PARTIES = (
    "Northwind Logistics",
    "Harbor & Vale LLP",
    "Corvid Analytics",
    "Bellweather Energy",
    "Quillon Health",
    "Ostrander Mining",
    "Pelican Freight",
    "Marlowe Biotech",
    "Ashgrove Capital",
    "Tessellate Software",
    "Kestrel Aerospace",
    "Juniper Retail Group",
)
NOUNS = (
    "deliverables",
    "service levels",
    "invoices",
    "personal data",
    "subcontractors",
    "acceptance tests",
    "warranty claims",
    "audit records",
    "security incidents",
    "change requests",
    "escrow materials",
    "insurance certificates",
    "milestone payments",
    "source code",
    "confidential information",
    "background intellectual property",
    "termination assistance",
    "service credits",
    "force majeure events",
    "export controls",
    "backup copies",
    "latency budgets",
    "retry policies",
    "rate limits",
    "schema migrations",
    "access tokens",
)
VERBS = (
    "deliver",
    "notify the other party of",
    "maintain",
    "indemnify the customer against",
    "retain",
    "review",
    "approve",
    "encrypt",
    "report on",
    "remedy",
    "certify",
    "document",
    "escalate",
    "suspend",
    "reconcile",
)
EVENTS = (
    "effective date",
    "written notice",
    "the end of each quarter",
    "acceptance",
    "any material breach",
    "a change of control",
    "the renewal date",
    "the first production release",
    "an audit request",
)
QUALIFIERS = (
    "Unless otherwise agreed in writing,",
    "Subject to clause {ref},",
    "Notwithstanding anything to the contrary,",
    "Except as required by applicable law,",
    "Without prejudice to its other rights,",
    "Where the customer so requests,",
    "For the avoidance of doubt,",
    "",
    "",
)
SENTENCES = (
    "{q} {party} shall {verb} the {noun} within {n} days of {event}.",
    "{q} the {noun} remain subject to the limits set out in clause {ref}.",
    "{party} may not assign its obligations regarding {noun} without prior consent.",
    "{q} fees for {noun} are payable in {cur} {amount} per month, invoiced in arrears.",
    "The liability of {party} for {noun} is capped at {cur} {amount} in any contract year.",
    "{q} either party may terminate on {n} days notice if the {noun} are not provided.",
    "Records of {noun} shall be kept for {n} months and made available on request.",
    "{party} warrants that the {noun} comply with the specification in schedule {ref}.",
    "A failure to {verb} the {noun} counts as a material breach after {n} business days.",
    "The steering committee meets every {n} weeks to review {noun} and {noun2}.",
    "{q} {party} bears the cost of {noun2} arising from {event}.",
    "Disputes about {noun} go first to the project managers and then to arbitration.",
)
SECTION_TITLES = (
    "Definitions",
    "Scope of Services",
    "Fees and Payment",
    "Service Levels",
    "Data Protection",
    "Intellectual Property",
    "Confidentiality",
    "Warranties",
    "Liability",
    "Term and Termination",
    "Governance",
    "Subcontracting",
    "Audit",
    "Insurance",
    "Exit Management",
    "Dispute Resolution",
    "General",
)
CURRENCIES = ("USD", "EUR", "GBP")

_PIECE = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` takes in a Gemma-style tokenizer, estimated without one.

    Gemma splits every digit, most punctuation marks are one token, and plain English words of
    this generator average about 1.1 tokens.
    """
    words = digits_or_marks = 0
    for piece in _PIECE.findall(text):
        if piece[0].isalpha():
            words += 1
        else:
            digits_or_marks += 1
    return round(words * 1.1 + digits_or_marks)


def sentence(rng: random.Random, parties: tuple[str, str]) -> str:
    """One clause-like sentence."""
    template = rng.choice(SENTENCES)
    ref = f"{rng.randint(1, 17)}.{rng.randint(1, 9)}"
    q = rng.choice(QUALIFIERS).format(ref=ref)
    text = template.format(
        q=q,
        party=rng.choice(parties),
        verb=rng.choice(VERBS),
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        event=rng.choice(EVENTS),
        n=rng.choice((5, 10, 14, 30, 45, 60, 90)),
        ref=ref,
        cur=rng.choice(CURRENCIES),
        amount=f"{rng.randint(2, 950) * 1000:,}",
    ).strip()
    return text[0].upper() + text[1:]


def document(rng: random.Random, number: int, tokens: int) -> tuple[str, list[str]]:
    """A contract of about ``tokens`` tokens and the titles of its sections, in order."""
    first, second = rng.sample(PARTIES, 2)
    parts = [
        f"MASTER SERVICES AGREEMENT No. {number:04d}\n",
        f"between {first} (the Supplier) and {second} (the Customer), "
        f"dated {rng.randint(1, 28)} {rng.choice(('March', 'June', 'October'))} "
        f"{rng.randint(2019, 2026)}.\n",
    ]
    titles: list[str] = []
    used = estimate_tokens("".join(parts))
    while used < tokens:
        title = SECTION_TITLES[len(titles) % len(SECTION_TITLES)]
        titles.append(title)
        heading = f"\n{len(titles)}. {title}\n"
        parts.append(heading)
        used += estimate_tokens(heading)
        for clause in range(1, rng.randint(4, 7) + 1):
            line = f"{len(titles)}.{clause} {sentence(rng, (first, second))}\n"
            parts.append(line)
            used += estimate_tokens(line)
            if used >= tokens:
                break
    return "".join(parts), titles


def paragraph(rng: random.Random, tokens: int, parties: tuple[str, str]) -> str:
    """Running prose of about ``tokens`` tokens."""
    out: list[str] = []
    used = 0
    while used < tokens:
        s = sentence(rng, parties)
        out.append(s)
        used += estimate_tokens(s) + 1
    return " ".join(out)


__all__ = ["document", "estimate_tokens", "paragraph", "sentence"]
