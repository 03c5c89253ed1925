"""Dataset rows and files as ms-swift reads them, checked before loading: a local file's format and rows
(``dataset_files.py``) and what one row holds: messages, images, teacher views (``dataset_rows.py``). Imports
core/ and options/; a new column or file format goes here."""
