#!/bin/sh
# One request of the file service: a file name on the first line, its contents back.
# The bug on purpose: the name is not checked, so '../' leaves /srv/files.
read -r name
cat "/srv/files/$name" 2>&1
