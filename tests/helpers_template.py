"""A `module:function` template used by the tests: returns (text, trained) pairs."""


def render(record):
    return [(f"Q: {record['q']}\nA:", False), (f" {record['a']}", True)]
