print("xe-vfio-user")
