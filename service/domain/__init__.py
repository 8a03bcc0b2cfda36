"""Pure domain rules: validation, identifiers, statuses, rate limits. No I/O imports here."""
