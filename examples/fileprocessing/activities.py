"""The three activities (download, process, upload); defined in sessionq.cli.fileprocessing.activities."""

from sessionq.cli.fileprocessing.activities import ACTIVITIES, download_file, process_file, upload_file

__all__ = ["ACTIVITIES", "download_file", "process_file", "upload_file"]
