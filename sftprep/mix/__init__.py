"""Mixing: the recipe between tokenized samples and packing.

    kept samples (every source, input order) --recipe.plan--> duplicates dropped, validation split held out,
                                                              each source's weight applied (choose / repeat /
                                                              proportion) --> train and validation selections

Every choice is made from the samples' content hashes (and the seed), never from their position in a file,
so it is the same whatever the file order, the number of parts, or the other sources.
"""
