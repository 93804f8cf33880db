"""
The applications, above the paper: search (the index on disk, the cascade, Qdrant), the search
server and its page, the mteb adapter, what each Meta Token reads. They import the paper (the root
files) and the machinery, never the reverse; search.py and explain.py at the root are their command lines.
"""
