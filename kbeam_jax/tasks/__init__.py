"""The papers' problems as reusable definitions: objective, domain, known solution."""
