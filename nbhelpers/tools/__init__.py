"""Tools: the workbook command line, the papermill runner, the notebook session, benchmarks."""
