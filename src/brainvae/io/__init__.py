"""Reading, writing and downloading brain MR data."""
