"""Files in and out: format sniffing and header checks (formats), X-rays to edit (images), anatomy and
pathology masks (masks), the DICOM Secondary Capture + Segmentation writers and the X-ray reader (dicom).

Every refusal is an ``InputError`` that names the file. Nothing here imports the model or the service.
"""
